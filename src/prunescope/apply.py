"""The only place that mutates modules for the LLM pruning pipeline: hard zeros from keep-masks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


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
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for {name}.weight has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                f"expected a bool mask of shape {tuple(weight.shape)}"
            )
        targets.append((weight, mask))
    for weight, mask in targets:
        weight.masked_fill_(~mask.to(weight.device), 0)
