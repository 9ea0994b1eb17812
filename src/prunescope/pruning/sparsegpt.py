"""SparseGPT (Frantar & Alistarh 2023): prune a Linear weight and update the kept weights (OBS).

Pure: ``prune(W, H, pattern) -> (W', keep)``; nothing here touches a module.

The layer-wise problem is ``min ||W X - W' X||^2`` with ``W'`` sparse, where ``X`` ([in, tokens])
are calibration inputs and ``H = 2 X X^T`` ([in, in]). Columns are eliminated left to right; when
column ``i`` is quantised to its masked value ``q_i``, the optimal brain surgeon update spreads the
error over the columns not yet processed:

    err = (w_i - q_i) / [H_F^-1]_ii ,   W[:, F] -= err  [H_F^-1]_{i, F}

where ``F = {i, ..., in-1}``. The rows of the inverse Hessians of all the shrinking sets ``F`` are,
up to a scale, the rows of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``):
``[H_F^-1]_{i, F} / sqrt([H_F^-1]_ii) = U[i, F]``; so ``err = (w_i - q_i) / U_ii`` and the update is
``err * U[i, F]``. Work is done in blocks of ``block_size`` columns (lazy batch updates): inside a
block one column at a time, then one matrix product for everything to the right.

Mask selection is adaptive, per block: for unstructured sparsity the ``p`` fraction of the block
with the lowest OBS saliency ``w^2 / [H_F^-1]_ii^2 = w^2 / U_ii^2`` (compared across the whole
block, all rows); for N:M, the ``N`` lowest of each group of ``M`` when the group is reached.
"""

from __future__ import annotations

import logging

import torch

from prunescope.pruning import masks
from prunescope.pruning.patterns import SparsityPattern

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` ([in, in], float64 maths).

    ``damp = percdamp * mean(diag H)``; dead inputs (``H_jj = 0``) get ``H_jj = 1``. If ``H`` is
    still not positive definite the dampening is raised tenfold, up to three times (logged).
    """
    # At most two [in, in] float64 matrices live at once (the Hessian of a 5632-wide input is
    # 254 MB in float64): the dampening is added to the diagonal in place, not as H + damp * I.
    h = hessian.detach().double().clone()  # [in, in]
    diag = h.diagonal()  # a view: writes go into h
    diag[diag == 0] = 1.0
    undamped = diag.clone()  # [in]
    damp = percdamp * torch.mean(undamped)
    for attempt in range(4):
        diag.copy_(undamped + damp)
        chol, info = torch.linalg.cholesky_ex(h)  # lower L, H = L L^T
        if int(info) == 0:
            break
        log.warning("Hessian not positive definite; raising dampening %g -> %g", damp, damp * 10)
        damp = damp * 10
    else:
        raise ValueError("the calibration Hessian is not positive definite even with dampening")
    del h, diag
    h_inv = torch.cholesky_inverse(chol)  # [in, in]
    del chol
    return torch.linalg.cholesky(h_inv, upper=True)  # U, H^-1 = U^T U


def _block_prune_mask(wt_block: torch.Tensor, u_diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune-mask (True = prune) of the lowest-saliency ``sparsity`` fraction of a block [B, out]."""
    saliency = wt_block.pow(2) / u_diag.pow(2)[:, None]  # [B, out]
    return ~masks.layer_keep_mask(saliency, sparsity)


def _nm_prune_mask(wt_group: torch.Tensor, u_diag: torch.Tensor, n: int) -> torch.Tensor:
    """Prune-mask (True = prune) of the ``n`` lowest-saliency inputs of each output in a group [M, out]."""
    saliency = wt_group.pow(2) / u_diag.pow(2)[:, None]  # [M, out]
    return ~masks.nm_keep_mask(saliency.T, n, wt_group.shape[0]).T


def _solve_block(
    wt1: torch.Tensor, u1: torch.Tensor, prune1: torch.Tensor, pattern: SparsityPattern | None
) -> torch.Tensor:
    """Eliminate the inputs of one block in place (transposed: ``wt1`` is [B, out]).

    Returns ``err`` [B, out] for the lazy update of the inputs to the right of the block.
    Working on the transpose keeps every per-input row contiguous (several times faster on CPU).
    """
    err = torch.zeros_like(wt1)  # [B, out]
    diag = torch.diag(u1)  # [B]
    for i in range(wt1.shape[0]):
        if pattern is not None and pattern.is_nm and i % pattern.m == 0:
            rows = slice(i, i + pattern.m)
            prune1[rows] = _nm_prune_mask(wt1[rows], diag[rows], pattern.n)
        w = wt1[i]  # [out]
        q = w.masked_fill(prune1[i], 0.0)  # [out]
        e = (w - q) / diag[i]  # [out]
        wt1[i:].addr_(u1[i, i:], e, alpha=-1.0)  # [B-i, out] -= u[i, i:]^T e
        wt1[i] = q
        err[i] = e
    return err


@torch.no_grad()
def prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: choose a mask and update the kept weights to compensate what is cut.

    Args:
        weight: ``[out, in]`` Linear weight (not modified).
        hessian: ``[in, in]`` ``2 X X^T`` of the calibration inputs (any positive scale).
        pattern: unstructured fraction or N:M; ignored when ``keep`` is given.
        keep: a fixed keep-mask ``[out, in]`` (True = keep) instead of adaptive selection; the
            weights are still updated (used by tests and for re-solving a known mask).
        block_size: columns per lazy-update block (rounded down to a multiple of M for N:M).
        percdamp: dampening as a fraction of the mean Hessian diagonal.

    Returns:
        ``(new_weight, keep)``: the updated weight in the input dtype with exact zeros where
        ``keep`` is False, and the boolean keep-mask.
    """
    if (pattern is None) == (keep is None):
        raise ValueError("pass exactly one of pattern or keep")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if pattern is not None and pattern.is_nm:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    wt = weight.detach().float().T.contiguous()  # [in, out]
    wt[torch.diag(hessian) == 0] = 0.0  # inputs never seen: free to drop
    u = inverse_hessian_factor(hessian, percdamp).to(wt.device, torch.float32)  # [in, in]
    prune_t = torch.zeros_like(wt, dtype=torch.bool) if keep is None else ~keep.to(wt.device).T
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wt1 = wt[i1:i2]  # [B, out], a view: solved in place
        u1 = u[i1:i2, i1:i2]  # [B, B]
        if keep is None and not pattern.is_nm:
            prune_t[i1:i2] = _block_prune_mask(wt1, torch.diag(u1), pattern.sparsity)
        err = _solve_block(wt1, u1, prune_t[i1:i2], None if keep is not None else pattern)
        wt[i2:] -= u[i1:i2, i2:].T @ err  # lazy update: [in-i2, B] @ [B, out]
    wt[prune_t] = 0.0
    keep_mask = ~prune_t.T
    w = wt.T
    return w.to(weight.dtype).contiguous(), keep_mask.contiguous()
