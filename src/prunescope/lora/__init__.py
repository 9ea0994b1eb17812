"""LoRA adapters: reading PEFT folders, spectra of ΔW without forming it, effective ranks,
rank advice and re-compression."""

from prunescope.lora.io import Adapter, LoraBlock, find_adapters, load_adapter
from prunescope.lora.spectrum import (
    batched_singular_values,
    effective_rank,
    energy_rank,
    lowrank_singular_values,
    lowrank_svd,
    spectrum_stats,
    stable_rank,
)

__all__ = [
    "Adapter", "LoraBlock", "batched_singular_values", "effective_rank", "energy_rank", "find_adapters", "load_adapter",
    "lowrank_singular_values", "lowrank_svd", "spectrum_stats", "stable_rank",
]
