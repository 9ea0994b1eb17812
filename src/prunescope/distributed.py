"""Calibration split across processes with ``torch.distributed``.

Every statistic the calibrated methods use is a sum over calibration tokens (Σx², XᵀX, Σx, the
block-influence sums, perplexity's NLL), so calibration splits exactly: each process takes every
``world``-th calibration window (and evaluation window), accumulates its partial sums, and the
sums are all-reduced before anything is chosen. Every process then holds the same statistics and
makes the same deterministic choices, so the models stay identical without sending weights;
process 0 (the *main* process) writes the report and the model.

Launch (one process per GPU, or several CPU processes with the gloo backend)::

    torchrun --nproc-per-node 4 -m prunescope prune MODEL --method sparsegpt ...
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m prunescope prune ...

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes reports and models (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group the launcher described (``MASTER_ADDR``, ``RANK``, ...): NCCL for
    CUDA devices, gloo otherwise. A no-op without a launcher or when already joined.

    Raises:
        PrunescopeError: the launcher's environment is incomplete or the group cannot form.
    """
    if not launched() or active():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PrunescopeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; launch with "
            "torchrun (or accelerate launch), which sets them"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on this process's GPU
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise PrunescopeError(f"could not form the process group ({backend}): {exc}") from exc
    log.info("process %d of %d (%s)", rank(), world_size(), backend)


def shard(blocks: torch.Tensor, what: str = "calibration windows") -> torch.Tensor:
    """This process's share of ``blocks`` (``[n, L]``): every ``world``-th window from its rank."""
    if not active():
        return blocks
    if blocks.shape[0] < world_size():
        raise PrunescopeError(
            f"{blocks.shape[0]} {what} cannot be split over {world_size()} processes; use at least "
            f"{world_size()} (one per process)"
        )
    return blocks[rank() :: world_size()]


def all_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place (every process gets the same result)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_numbers(*values: float) -> tuple[float, ...]:
    """Sums of plain numbers over all processes (float64), e.g. NLL totals and token counts."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tuple(float(v) for v in t.cpu())


def agree(what: str, value: str) -> None:
    """Refuse, in every process, when the processes were started with different ``value``s of
    ``what`` (a command line, a config): they would compute different things and sum them."""
    if not active():
        return
    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    other = next((r for r, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        raise PrunescopeError(
            f"the {len(values)} processes disagree on {what}: process 0 has {values[0]!r}, process "
            f"{other} has {values[other]!r}; start every process with the same command"
        )


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def refuse(what: str) -> None:
    """One clear line for work that runs in one process only, when launched in several."""
    if launched():
        raise PrunescopeError(
            f"{what} runs in one process; launch it without torchrun (only calibration and "
            "evaluation of prune and shrink split across processes)"
        )
