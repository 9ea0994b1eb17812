"""Activation swap ("relufication"): replace every recognised activation module of a model.

Mirzadeh et al. 2023 ("ReLU Strikes Back") swap GELU/SiLU for ReLU in pretrained LLMs and
fine-tune briefly to recover; here the swap is applied without fine-tuning, so the perplexity
change measures how much the pretrained weights rely on the activation's negative tail.
This is the one place in the activations package that mutates modules.
"""

from __future__ import annotations

from torch import nn

from prunescope.activations.sites import find_activations
from prunescope.errors import PrunescopeError

SWAPS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def check_swap(name: str) -> None:
    """Raise unless ``name`` is a supported replacement activation."""
    if name not in SWAPS:
        raise PrunescopeError(f"unknown --swap activation {name!r}; choose one of {', '.join(SWAPS)}")


def swap_activations(model: nn.Module, to: str) -> dict[str, str]:
    """Replace, in place, every recognised activation module by a fresh ``nn.<to>``.

    Returns:
        module name -> the family it had before.

    Raises:
        PrunescopeError: unknown ``to``, or no recognised activation in the model.
    """
    check_swap(to)
    found = find_activations(model)
    for name in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SWAPS[to]())
    return found
