"""Singular values of LoRA updates without forming ΔW, and the statistics built on them.

For ``ΔW = s * B @ A`` with ``B [out, r]`` and ``A [r, in]``: ``B = Q_B R_B`` and
``A^T = Q_A R_A`` (reduced QR), so ``ΔW = Q_B (s * R_B @ R_A^T) Q_A^T``. ``Q_B`` and ``Q_A`` have
orthonormal columns, hence ΔW has the singular values of the small ``r x r`` core, and its
singular vectors are ``Q_B U`` and ``Q_A V``. Cost: ``O((out + in) r^2)`` instead of the
``O(out * in * min(out, in))`` of a dense SVD. Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunescope.errors import PrunescopeError

ENERGY_LEVELS: tuple[float, ...] = (0.90, 0.95, 0.99)


def _core(B: torch.Tensor, A: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_B [out, p], core [p, q], Q_A [in, q])`` with ``ΔW = Q_B @ core @ Q_A^T``."""
    qb, rb = torch.linalg.qr(B.detach().to(torch.float64))  # [out, p], [p, r]
    qa, ra = torch.linalg.qr(A.detach().to(torch.float64).T)  # [in, q], [q, r]
    return qb, scale * (rb @ ra.T), qa  # core [p, q]


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of ``scale * B @ A`` (descending, float64, length ``min(out, r, in)``)."""
    # Only the R factors matter for the singular values: mode="r" skips forming Q (half the work).
    rb = torch.linalg.qr(B.detach().to(torch.float64), mode="r").R  # [p, r]
    ra = torch.linalg.qr(A.detach().to(torch.float64).T, mode="r").R  # [q, r]
    return torch.linalg.svdvals(scale * (rb @ ra.T))  # core [p, q]


def batched_singular_values(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> list[torch.Tensor]:
    """:func:`lowrank_singular_values` of many ``(B, A, scale)`` at once, in input order.

    Factors of equal shapes are stacked and go through one batched QR and one batched core SVD:
    a LoRA adapter has a handful of shapes repeated over layers, so this replaces hundreds of
    small LAPACK calls (dominated by per-call overhead at r = 64) with a few large ones.
    """
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (B, A, _) in enumerate(factors):
        groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(factors)
    for idx in groups.values():
        bs = torch.stack([factors[i][0].detach() for i in idx]).to(torch.float64)  # [g, out, r]
        at = torch.stack([factors[i][1].detach().T for i in idx]).to(torch.float64)  # [g, in, r]
        scales = torch.tensor([factors[i][2] for i in idx], dtype=torch.float64)  # [g]
        rb = torch.linalg.qr(bs, mode="r").R  # [g, p, r]
        ra = torch.linalg.qr(at, mode="r").R  # [g, q, r]
        sigma = torch.linalg.svdvals(scales[:, None, None] * (rb @ ra.transpose(1, 2)))  # [g, k]
        for row, i in enumerate(idx):
            out[i] = sigma[row]
    return out


def lowrank_svd(
    B: torch.Tensor, A: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U [out, k], S [k], Vh [k, in]`` of ``scale * B @ A`` in float64, ΔW never formed."""
    qb, core, qa = _core(B, A, scale)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)  # [p, k], [k], [k, q]
    return qb @ uc, s, vhc @ qa.T


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = sigma_i / sum(sigma)``; 0 for ΔW = 0."""
    total = float(sigma.sum())
    if total <= 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def stable_rank(sigma: torch.Tensor) -> float:
    """``sum(sigma^2) / sigma_1^2``; 0 for ΔW = 0."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    return float((sigma**2).sum()) / top**2 if top > 0 else 0.0


def energy_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} sigma_i^2 >= tau * sum sigma^2`` (PEFT's convention);
    0 for ΔW = 0. ``sigma`` must be sorted in descending order."""
    if not 0.0 < tau <= 1.0:
        raise PrunescopeError(f"energy level must be in (0, 1], got {tau}")
    energy = sigma.to(torch.float64) ** 2
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0)
    # a relative tolerance so tau = 1.0 is met despite rounding in the cumulative sum
    k = int(torch.searchsorted(cumulative, torch.tensor(tau * total * (1 - 1e-12), dtype=torch.float64)))
    return min(k + 1, sigma.numel())


@dataclass(frozen=True)
class SpectrumStats:
    """Scalar summaries of one singular-value spectrum."""

    effective_rank: float
    stable_rank: float
    energy_rank_90: int
    energy_rank_95: int
    energy_rank_99: int
    spectral_norm: float
    frobenius_norm: float
    top1_energy: float


def spectrum_stats(sigma: torch.Tensor) -> SpectrumStats:
    """All scalar statistics of a descending spectrum ``sigma``."""
    energy = float((sigma**2).sum())
    top = float(sigma[0]) if sigma.numel() else 0.0
    return SpectrumStats(
        effective_rank=effective_rank(sigma),
        stable_rank=stable_rank(sigma),
        energy_rank_90=energy_rank(sigma, 0.90),
        energy_rank_95=energy_rank(sigma, 0.95),
        energy_rank_99=energy_rank(sigma, 0.99),
        spectral_norm=top,
        frobenius_norm=math.sqrt(energy),
        top1_energy=top**2 / energy if energy > 0 else 0.0,
    )
