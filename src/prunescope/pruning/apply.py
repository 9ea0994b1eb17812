"""The only place that mutates modules for the LLM pruning pipeline: hard zeros from keep-masks,
and updated weight values (SparseGPT)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` tensor of the submodule ``name``; ValueError if it has none."""
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    return weight


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every weight entry whose keep-mask is False.

    Args:
        model: the model to modify.
        masks: module name -> ``BoolTensor`` shaped like that module's ``weight`` (True = keep).

    Raises:
        ValueError: a name that is not a module with a weight, or a mask of the wrong shape;
            checked for every mask before any weight changes, so nothing is half applied.
    """
    targets = []
    for name, mask in masks.items():
        weight = _weight_of(model, name)
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for {name}.weight has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                f"expected a bool mask of shape {tuple(weight.shape)}"
            )
        targets.append((weight, mask))
    for weight, mask in targets:
        weight.masked_fill_(~mask.to(weight.device), 0)


@torch.no_grad()
def apply_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Replace, in place, the weight values of the named modules (e.g. SparseGPT's updated weights).

    Args:
        model: the model to modify.
        weights: module name -> tensor shaped like that module's ``weight``.

    Raises:
        ValueError: a name that is not a module with a weight, or a tensor of the wrong shape;
            checked for every entry before any weight changes.
    """
    targets = []
    for name, new in weights.items():
        weight = _weight_of(model, name)
        if new.shape != weight.shape:
            raise ValueError(
                f"new weight for {name} has shape {tuple(new.shape)}; expected {tuple(weight.shape)}"
            )
        targets.append((weight, new))
    for weight, new in targets:
        weight.copy_(new.to(device=weight.device, dtype=weight.dtype))
