"""OWL (Yin et al. 2024): outlier-weighted layerwise sparsity.

Uniform sparsity treats every decoder layer alike, but layers differ in how many "outlier"
weights they hold: weights whose Wanda score ``|W_ij| * ||X_j||`` is far above the layer's mean.
OWL measures each layer's outlier ratio on the dense model and prunes layers with more outliers
less. Pure functions; the job runs the calibration pass that feeds them.

- Layerwise outlier distribution (LOD): ``D_l`` = the share of layer ``l``'s scores (all its
  pruned Linears together) above ``M`` times their mean (paper default ``M = 5``).
- Allocation: ``D`` is rescaled to ``[0, 2 lambda]`` (min to 0, max to ``2 lambda``), centred,
  and subtracted from the target: ``s_l = S - (D'_l - mean(D'))``; so the mean over layers is
  exactly ``S`` and every layer lies within ``S +- lambda`` (paper default ``lambda = 0.08``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], m: float = DEFAULT_M) -> float:
    """Share of all entries of a decoder layer's scores above ``m`` x their pooled mean.

    Args:
        scores: gives the layer's Wanda scores, each ``[out, in]`` (any shapes; pooled together).
            Called twice, once for the mean and once to count, so that the layer's scores are
            made one Linear at a time and never all held at once.
        m: the outlier threshold as a multiple of the pooled mean.
    """
    if not m > 0:
        raise ValueError(f"the outlier threshold M must be positive, got {m}")
    total, summed = 0, 0.0
    for s in scores():
        total += s.numel()
        summed += float(s.double().sum())
    if not total:
        raise ValueError("outlier_ratio needs at least one score")
    threshold = m * summed / total
    return sum(int((s > threshold).sum()) for s in scores()) / total


def allocate(ratios: Sequence[float], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean ``sparsity``, more outliers -> pruned less.

    Args:
        ratios: each layer's outlier ratio ``D_l``.
        sparsity: the target mean sparsity ``S`` in (0, 1).
        lam: half the spread: layers get sparsities within ``S +- lam``.
    """
    if not ratios:
        raise ValueError("allocate needs at least one layer's outlier ratio")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if not 0.0 <= lam < min(sparsity, 1.0 - sparsity):
        raise ValueError(
            f"OWL lambda must be in [0, {min(sparsity, 1.0 - sparsity):g}) at sparsity {sparsity:g} "
            f"(every layer stays within sparsity +- lambda, inside (0, 1)), got {lam}"
        )
    d = torch.tensor(ratios, dtype=torch.float64)  # [layers]
    spread = float(d.max() - d.min())
    if spread == 0.0:
        return [sparsity] * len(ratios)
    scaled = (d - d.min()) / spread * (2 * lam)  # [layers] in [0, 2 lam]
    return (sparsity - (scaled - scaled.mean())).tolist()


def allocate_by_index(
    ratios: Mapping[int, float], sparsity: float, lam: float = DEFAULT_LAMBDA
) -> dict[int, float]:
    """:func:`allocate` keyed by decoder-layer index."""
    order = sorted(ratios)
    return dict(zip(order, allocate([ratios[i] for i in order], sparsity, lam)))
