"""Importance scores for LLM weight pruning: pure functions of a weight (and input statistics).

A higher score means more important; masks (``prunescope.pruning.masks``) prune the lowest scores.
"""

from __future__ import annotations

import torch


def magnitude(weight: torch.Tensor, p: int = 1) -> torch.Tensor:
    """``|w|^p`` elementwise (L1 magnitude for ``p = 1``); same ranking for any ``p > 0``."""
    scores = weight.detach().float().abs()  # [out, in]
    return scores if p == 1 else scores.pow(p)


def random(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform random scores shaped like ``weight``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape, generator=gen)


def wanda(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda score (Sun et al. 2023): ``|W_ij| * ||X_j||_2``.

    Args:
        weight: ``[out, in]`` Linear weight.
        input_sq_sum: ``[in]`` sum over calibration tokens of the squared input feature ``x_j^2``
            (any positive constant factor, e.g. a mean instead of a sum, gives the same masks
            because scores are only compared within a row or group).

    Returns:
        ``[out, in]`` float32 scores.
    """
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(
            f"input statistics of shape {tuple(input_sq_sum.shape)} do not match weight "
            f"{tuple(weight.shape)}; expected [{weight.shape[1]}]"
        )
    col_norm = input_sq_sum.detach().float().clamp_min(0).sqrt()  # [in]
    return weight.detach().float().abs() * col_norm[None, :]  # [out, in]
