"""Pure functions from importance scores to boolean keep-masks (True = keep, as torch's mask 1).

Nothing here touches a module: callers pass score tensors and get masks back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def global_keep_masks(scores: Sequence[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Keep-masks that prune the ``n_prune`` smallest scores across all tensors together.

    Equivalent to concatenating every score and pruning the ``n_prune`` smallest (the semantics
    of ``torch.nn.utils.prune.global_unstructured`` on tie-free scores), returned per tensor.

    Args:
        scores: non-negative importance scores, one tensor per pruned parameter.
        n_prune: how many entries to prune in total, ``0 <= n_prune <= total``.

    Returns:
        One ``BoolTensor`` per score tensor, same shape, True where the entry is kept.
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= n_prune <= total:
        raise ValueError(f"n_prune must be in [0, {total}], got {n_prune}")
    if n_prune == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])  # [total]
    pruned_idx = torch.topk(flat, n_prune, largest=False).indices  # [n_prune]
    keep = torch.ones(total, dtype=torch.bool)
    keep[pruned_idx] = False
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out
