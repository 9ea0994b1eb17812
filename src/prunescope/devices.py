"""Devices and dtypes: what ``--device`` and ``--dtype`` mean, checked before any heavy work.

``auto`` picks the accelerator when there is one (CUDA, then Apple's MPS, else the CPU) and the
checkpoint's own dtype (float32 where the checkpoint says nothing, or says float16 and the model
runs on the CPU, whose float16 kernels are slow and partly missing). An explicit choice is
checked: a device that is not present, or a dtype the device cannot compute in, is one
:class:`~prunescope.errors.PrunescopeError` naming what would work.

Numerics do not follow the model's dtype: calibration statistics (sums of x, x², XᵀX) are
accumulated in float32 or float64, SparseGPT's inverse Hessian is computed in float64, and
perplexity sums its negative log-likelihoods in float64 (see :mod:`prunescope.pruning.calib`,
:mod:`prunescope.pruning.sparsegpt` and :mod:`prunescope.evaluate`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPE_CHOICES = "auto, " + ", ".join(DTYPES)
# where only shapes matter (tests, planning); accepted from Python, not offered on the CLI
_SHAPE_ONLY = "meta"


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Raises:
        PrunescopeError: an unknown name, or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        return _auto_device()
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            raise PrunescopeError(f"unknown device {spec!r}; choose one of {DEVICE_CHOICES}") from exc
    local = _local_rank()
    if device.type == "cuda" and device.index is None and local is not None:
        device = torch.device("cuda", local)  # torchrun: one GPU per process
    if device.type not in ("cpu", "cuda", "mps", _SHAPE_ONLY):
        raise PrunescopeError(f"unsupported device {str(device)!r}; choose one of {DEVICE_CHOICES}")
    _check_present(device)
    return device


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        local = _local_rank()  # under torchrun the process's own GPU, else the current one
        return torch.device("cuda", torch.cuda.current_device() if local is None else local)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _local_rank() -> int | None:
    """The launcher's per-machine process index (torchrun's LOCAL_RANK), if launched."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def _check_present(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunescopeError(
                f"device {str(device)!r} is not present on this machine (torch sees no CUDA device"
                f"{'' if torch.version.cuda else '; this torch is a CPU-only build'}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PrunescopeError(
                f"device {str(device)!r} is not present: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PrunescopeError("device 'mps' is not present on this machine; use --device cpu or auto")


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a Hugging Face config says its weights were saved in, if it says one."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(
    spec: str | torch.dtype = "auto", device: torch.device | None = None, saved: torch.dtype | None = None
) -> torch.dtype:
    """The parameter dtype for ``spec`` on ``device`` given the checkpoint's ``saved`` dtype.

    Raises:
        PrunescopeError: an unknown dtype, or one ``device`` cannot compute in (bfloat16 on a
            CUDA device older than Ampere).
    """
    device = device or torch.device("cpu")
    if isinstance(spec, torch.dtype):
        dtype = spec
        if dtype not in DTYPES.values():
            raise PrunescopeError(f"unsupported dtype {dtype}; choose one of {DTYPE_CHOICES}")
    elif spec == "auto":
        dtype = saved if saved in DTYPES.values() else torch.float32
        if dtype == torch.float16 and device.type == "cpu":
            log.info("the checkpoint is float16; computing in float32 on the CPU (pass --dtype to choose)")
            dtype = torch.float32
        if dtype == torch.bfloat16 and not _bf16_ok(device):
            log.info("the checkpoint is bfloat16, which %s cannot compute in; using float32", device)
            dtype = torch.float32
        return dtype
    elif spec in DTYPES:
        dtype = DTYPES[spec]
    else:
        raise PrunescopeError(f"unknown dtype {spec!r}; choose one of {DTYPE_CHOICES}")
    if dtype == torch.bfloat16 and not _bf16_ok(device):
        raise PrunescopeError(
            f"{str(device)!r} cannot compute in bfloat16 (CUDA needs compute capability 8.0 or "
            f"newer); use --dtype float16 or float32"
        )
    return dtype


def _bf16_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
