"""Rank advice and re-compression: truncate each ΔW to the smallest rank that keeps a share of
its energy (sum of sigma^2), and write the result as a valid PEFT adapter.

The new factors come from the thin SVD of ΔW computed without forming it
(:func:`prunescope.lora.spectrum.lowrank_svd`): ``ΔW_k = U_k S_k V_k^T = s * B' @ A'`` with
``B' = U_k sqrt(S_k / s)`` and ``A' = sqrt(S_k / s) V_k^T``. The scale ``s`` of every module is
preserved by writing ``alpha_pattern[module] = s * k`` (and ``use_rslora = false``), with
``rank_pattern[module] = k``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from prunescope import atomic
from prunescope.errors import PrunescopeError
from prunescope.lora.io import CONFIG_FILE, Adapter, LoraBlock
from prunescope.lora.spectrum import energy_rank, lowrank_svd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressConfig:
    """Validated options of ``lora compress``."""

    energy: float = 0.95
    max_rank: int | None = None
    min_rank: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise PrunescopeError(f"--energy must be in (0, 1], e.g. 0.95; got {self.energy}")
        if self.min_rank < 1:
            raise PrunescopeError(f"--min-rank must be >= 1, got {self.min_rank}")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise PrunescopeError(f"--max-rank {self.max_rank} must be >= --min-rank {self.min_rank}")


@dataclass(frozen=True)
class ModuleCompression:
    """What truncation did to one module."""

    name: str
    layer: int | None
    module_type: str
    old_rank: int
    new_rank: int
    kept_energy: float
    relative_frobenius_error: float
    old_parameters: int
    new_parameters: int


@dataclass(frozen=True)
class CompressResult:
    """The result of ``prunescope lora compress``."""

    adapter: str
    output: str
    energy: float
    max_rank: int | None
    min_rank: int
    modules: tuple[ModuleCompression, ...]
    old_parameters: int
    new_parameters: int
    parameter_saving: float
    notes: tuple[str, ...]


def choose_rank(sigma: torch.Tensor, config: CompressConfig, old_rank: int) -> int:
    """Energy rank of ``sigma`` clipped to ``[min_rank, max_rank]`` and to the old rank."""
    k = max(energy_rank(sigma, config.energy), config.min_rank)
    if config.max_rank is not None:
        k = min(k, config.max_rank)
    return max(1, min(k, old_rank, sigma.numel()))


def truncate_block(
    block: LoraBlock, config: CompressConfig
) -> tuple[torch.Tensor, torch.Tensor, ModuleCompression]:
    """New factors ``B' [out, k]``, ``A' [k, in]`` (float64, 2-D) with ``scale * B' @ A' = ΔW_k``."""
    u, s, vh = lowrank_svd(block.B, block.A, block.scale)  # [out, m], [m], [m, in]
    k = choose_rank(s, config, block.rank)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = torch.sqrt(s[:k] / block.scale)  # [k]
    new_b, new_a = u[:, :k] * root, root[:, None] * vh[:k]  # [out, k], [k, in]
    out_f, in_f = block.shape
    info = ModuleCompression(
        name=block.name, layer=block.layer, module_type=block.module_type, old_rank=block.rank,
        new_rank=k, kept_energy=kept, relative_frobenius_error=max(0.0, 1.0 - kept) ** 0.5,
        old_parameters=block.parameters, new_parameters=k * (out_f + in_f),
    )
    return new_b, new_a, info


def _stored(block: LoraBlock, new_b: torch.Tensor, new_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors in PEFT's stored layout and dtype (conv kernels restored)."""
    k = new_a.shape[0]
    dtype = block.A.dtype
    a = new_a.reshape(k, *block.a_shape[1:]).to(dtype).contiguous()
    b = new_b.reshape(block.b_shape[0], k, *block.b_shape[2:]).to(dtype).contiguous()
    return a, b


def _new_config(adapter: Adapter, infos: list[ModuleCompression], blocks: tuple[LoraBlock, ...]) -> dict:
    config = copy.deepcopy(dict(adapter.config))
    ranks = {i.name: i.new_rank for i in infos}
    config["r"] = max(ranks.values())
    config["use_rslora"] = False
    config["rank_pattern"] = ranks
    config["alpha_pattern"] = {b.name: b.scale * ranks[b.name] for b in blocks}
    config["lora_alpha"] = blocks[0].scale * config["r"]
    return config


def compress_adapter(adapter: Adapter, config: CompressConfig, out: str | Path) -> CompressResult:
    """Truncate every module of ``adapter`` and write a PEFT adapter folder at ``out``,
    atomically (built in a temporary sibling and renamed into place, replacing a folder there:
    an interrupted write leaves nothing that loads as an adapter).

    Raises:
        PrunescopeError: for DoRA adapters (the magnitude vector depends on the base weight and
            on the direction of ΔW, so truncating B @ A alone would change the model unpredictably).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if adapter.config.get("use_dora") or any("lora_magnitude_vector" in k for k in adapter.extra):
        raise PrunescopeError(
            f"{adapter.path} is a DoRA adapter; re-compression needs the base model and is not supported"
        )
    out = Path(out)
    state = {k: v.contiguous() for k, v in adapter.extra.items()}
    infos = []
    for block in tqdm(adapter.blocks, desc="truncating", disable=len(adapter.blocks) < 100):
        new_b, new_a, info = truncate_block(block, config)
        state[block.a_key], state[block.b_key] = _stored(block, new_b, new_a)
        infos.append(info)
    new_config = _new_config(adapter, infos, adapter.blocks)
    with atomic.new_folder(out) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
    old = sum(i.old_parameters for i in infos)
    new = sum(i.new_parameters for i in infos)
    return CompressResult(
        adapter=str(adapter.path), output=str(out), energy=config.energy, max_rank=config.max_rank,
        min_rank=config.min_rank, modules=tuple(infos), old_parameters=old, new_parameters=new,
        parameter_saving=1.0 - new / old if old else 0.0, notes=adapter.notes,
    )
