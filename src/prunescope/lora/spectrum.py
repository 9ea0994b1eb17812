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


# Below this sigma_min / sigma_max the Gram route's rounding (about 1e-16 * sigma_max^2 absolute on
# sigma^2) could exceed 1e-8 relative on sigma_min; such blocks go through the QR route instead.
_GRAM_MIN_RATIO = 1e-4


def _gram_singular_values(bs: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ``B_g @ A_g`` for stacked ``bs [g, out, r]`` and ``at [g, in, r]`` (A^T).

    ``sigma^2`` are the eigenvalues of ``L^T (A A^T) L`` with ``B^T B = L L^T`` (Cholesky): two
    batched GEMMs and small ``r x r`` factorisations instead of two Householder QRs. Returns the
    descending values and a per-block flag saying whether they are accurate to ~1e-8 relative
    (Cholesky succeeded and ``sigma_min / sigma_max >= _GRAM_MIN_RATIO``).
    """
    gram_b = bs.transpose(1, 2) @ bs  # [g, r, r]
    gram_a = at.transpose(1, 2) @ at  # [g, r, r]
    chol, info = torch.linalg.cholesky_ex(gram_b)  # [g, r, r], [g]
    core = chol.transpose(1, 2) @ gram_a @ chol  # [g, r, r], symmetric PSD
    eig = torch.linalg.eigvalsh(0.5 * (core + core.transpose(1, 2))).flip(-1)  # [g, r], descending
    ok = (info == 0) & (eig[:, -1] >= _GRAM_MIN_RATIO**2 * eig[:, 0]) & (eig[:, 0] > 0)
    return eig.clamp_min(0).sqrt(), ok


def batched_singular_values(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> list[torch.Tensor]:
    """:func:`lowrank_singular_values` of many ``(B, A, scale)`` at once, in input order.

    Factors of equal shapes are stacked (an adapter repeats a handful of shapes over its layers).
    Each group first takes the Gram route (:func:`_gram_singular_values`: batched GEMMs, several
    times faster than QR); blocks whose spectrum spans more than ``1 / _GRAM_MIN_RATIO`` (or is
    rank-deficient) are recomputed by the QR route, so every value keeps QR's accuracy where it
    matters.
    """
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (B, A, _) in enumerate(factors):
        groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(factors)
    for idx in groups.values():
        bs = torch.stack([factors[i][0].detach() for i in idx]).to(torch.float64)  # [g, out, r]
        at = torch.stack([factors[i][1].detach().T for i in idx]).to(torch.float64)  # [g, in, r]
        k = min(bs.shape[1], at.shape[1], bs.shape[2])
        if bs.shape[2] <= min(bs.shape[1], at.shape[1]):  # the Gram route needs r <= out, in
            sigma, ok = _gram_singular_values(bs, at)  # [g, r], [g]
        else:
            sigma, ok = bs.new_zeros(len(idx), k), torch.zeros(len(idx), dtype=torch.bool)
        for row, i in enumerate(idx):
            B, A, scale = factors[i]
            out[i] = abs(scale) * sigma[row, :k] if ok[row] else lowrank_singular_values(B, A, scale)
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
