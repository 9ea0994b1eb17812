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
from dataclasses import dataclass

import torch

from prunescope.pruning import masks
from prunescope.pruning.patterns import SparsityPattern

log = logging.getLogger(__name__)


_FACTOR_BLOCK = 256  # columns per step of the blocked in-place factorization


def _reverse_flat_(a: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Reverse the elements of a contiguous matrix in place: ``A -> P A P`` (P reverses order).

    Element ``(i, j)`` moves to ``(n-1-i, n-1-j)``, which is the flat index reversed; swapping
    chunk pairs from both ends needs two chunk-sized temporaries, not a second matrix."""
    flat = a.view(-1)
    total = flat.numel()
    for lo in range(0, total // 2, chunk):
        size = min(chunk, total // 2 - lo)
        front = flat[lo : lo + size].flip(0)  # a copy
        back = flat[total - lo - size : total - lo]  # view
        flat[lo : lo + size] = back.flip(0)
        back.copy_(front)


def _cholesky_lower_(a: torch.Tensor, block: int = _FACTOR_BLOCK) -> int:
    """Left-looking blocked Cholesky of a symmetric matrix in place: the lower triangle becomes L.

    The strict upper triangle keeps ``A`` (so a failed attempt can be undone, see
    :func:`_restore_lower_`). Returns 0 on success, else the 1-based column where ``A`` was found
    not positive definite. Temporaries are ``[n, block]``, never ``[n, n]``."""
    n = a.shape[0]
    for k1 in range(0, n, block):
        k2 = min(k1 + block, n)
        upper = a[k1:k2, k1:k2].triu(1)  # [B, B] the diagonal block's A, kept
        if k1:
            panel = a[k1:, k1:k2]  # [n-k1, B] view
            panel.addmm_(a[k1:, :k1], a[k1:k2, :k1].T, alpha=-1.0)
        l_kk, info = torch.linalg.cholesky_ex(a[k1:k2, k1:k2])  # [B, B]
        if int(info):
            a[k1:k2, k1:k2].copy_(upper)  # the block's upper half back to A (lower: restored later)
            return k1 + int(info)
        a[k1:k2, k1:k2].copy_(l_kk + upper)
        if k2 < n:  # L[k2:, k] = A[k2:, k] L_kk^-T
            a[k2:, k1:k2] = torch.linalg.solve_triangular(l_kk.T, a[k2:, k1:k2], upper=True, left=False)
    return 0


def _restore_lower_(a: torch.Tensor, diag: torch.Tensor, block: int = _FACTOR_BLOCK) -> None:
    """Undo a failed :func:`_cholesky_lower_`: copy the kept strict upper triangle down, set ``diag``."""
    n = a.shape[0]
    for k1 in range(0, n, block):
        k2 = min(k1 + block, n)
        d = a[k1:k2, k1:k2]  # [B, B]
        d.copy_(d.triu(1) + d.triu(1).T)
        if k2 < n:
            a[k2:, k1:k2] = a[k1:k2, k2:].T
    a.diagonal().copy_(diag)


def _invert_lower_(a: torch.Tensor, block: int = _FACTOR_BLOCK) -> None:
    """Invert a lower-triangular matrix in place (strict upper triangle must be zero).

    Column blocks from the last: with ``X22 = L22^-1`` already in place below and to the right,
    ``X11 = L11^-1`` and ``X21 = -X22 L21 X11``."""
    n = a.shape[0]
    starts = list(range(0, n, block))
    for k1 in reversed(starts):
        k2 = min(k1 + block, n)
        eye = torch.eye(k2 - k1, dtype=a.dtype, device=a.device)
        x_kk = torch.linalg.solve_triangular(a[k1:k2, k1:k2], eye, upper=False)  # [B, B]
        if k2 < n:
            a[k2:, k1:k2] = -(a[k2:, k2:] @ a[k2:, k1:k2]) @ x_kk  # [n-k2, B]
        a[k1:k2, k1:k2] = x_kk


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, overwrite: bool = False
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` ([in, in], float32 maths).

    ``damp = percdamp * mean(diag H)``; dead inputs (``H_jj = 0``) get ``H_jj = 1``. If ``H`` is
    still not positive definite the dampening is raised tenfold, up to three times (logged).

    Memory: one ``[in, in]`` float32 matrix in all (127 MB for a 5632-wide input), computed in
    place: with ``overwrite=True`` that matrix is ``hessian`` itself (a float32 contiguous tensor
    the caller gives up), else a copy. How: with ``P`` the order reversal, factor
    ``P H P = L L^T`` (lower), invert ``L`` in place; then ``U = P L^-1 P`` is upper triangular and
    ``U^T U = P L^-T L^-1 P = H^-1``, the unique upper factor SparseGPT needs, found without
    forming ``H^-1``.
    """
    owned = overwrite and hessian.dtype == torch.float32 and hessian.is_contiguous()
    h = hessian.detach() if owned else hessian.detach().to(torch.float32, copy=True).contiguous()  # [in, in]
    undamped = h.diagonal().clone()  # [in]
    undamped[undamped == 0] = 1.0
    _reverse_flat_(h)  # P H P
    undamped = undamped.flip(0)
    damp = percdamp * torch.mean(undamped)
    for _attempt in range(4):
        h.diagonal().copy_(undamped + damp)
        failed_at = _cholesky_lower_(h)
        if not failed_at:
            break
        log.warning("Hessian not positive definite; raising dampening %g -> %g", damp, damp * 10)
        _restore_lower_(h, undamped)
        damp = damp * 10
    else:
        raise ValueError("the calibration Hessian is not positive definite even with dampening")
    h.tril_()  # L, zeros above
    _invert_lower_(h)  # L^-1
    _reverse_flat_(h)  # U = P L^-1 P
    return h


@dataclass(frozen=True)
class HessianFactor:
    """What SparseGPT needs of a Hessian, computed once for all the Linears that read one input.

    Attributes:
        u: ``[in, in]`` upper Cholesky factor of the dampened inverse Hessian (float32).
        dead: ``[in]`` True for inputs never seen in calibration (``H_jj = 0``).
    """

    u: torch.Tensor
    dead: torch.Tensor


def factor(hessian: torch.Tensor, percdamp: float = 0.01, overwrite: bool = False) -> HessianFactor:
    """The :class:`HessianFactor` of ``hessian`` ([in, in]); ``overwrite`` as in
    :func:`inverse_hessian_factor` (the job passes its own Hessian: no second [in, in] matrix)."""
    dead = torch.diag(hessian) == 0  # [in]
    return HessianFactor(inverse_hessian_factor(hessian, percdamp, overwrite), dead)


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
    hessian: torch.Tensor | HessianFactor,
    pattern: SparsityPattern | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: choose a mask and update the kept weights to compensate what is cut.

    Args:
        weight: ``[out, in]`` Linear weight (not modified).
        hessian: ``[in, in]`` ``2 X X^T`` of the calibration inputs (any positive scale), or its
            :func:`factor` (shared by the Linears reading one input; ``percdamp`` then unused).
        pattern: unstructured fraction or N:M; ignored when ``keep`` is given.
        keep: a fixed keep-mask ``[out, in]`` (True = keep) instead of adaptive selection; the
            weights are still updated (used by tests and for re-solving a known mask).
        block_size: columns per lazy-update block (rounded down to a multiple of M for N:M).
        percdamp: dampening as a fraction of the mean Hessian diagonal.

    Returns:
        ``(new_weight, keep)``: the updated weight in the input dtype with exact zeros where
        ``keep`` is False (a transposed view of the solver's ``[in, out]`` buffer: copy it
        into the module, or call ``.contiguous()`` before saving it), and the boolean keep-mask.
    """
    if (pattern is None) == (keep is None):
        raise ValueError("pass exactly one of pattern or keep")
    rows, cols = weight.shape
    fac = hessian if isinstance(hessian, HessianFactor) else factor(hessian, percdamp)
    if fac.u.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(fac.u.shape)} does not match weight {tuple(weight.shape)}")
    if pattern is not None and pattern.is_nm:
        block_size = max(pattern.m, block_size - block_size % pattern.m)
    wt = weight.detach().float().T.contiguous()  # [in, out]
    wt[fac.dead.to(wt.device)] = 0.0  # inputs never seen: free to drop
    u = fac.u.to(wt.device, torch.float32)  # [in, in]
    prune_t = torch.zeros_like(wt, dtype=torch.bool) if keep is None else ~keep.to(wt.device).T
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wt1 = wt[i1:i2]  # [B, out], a view: solved in place
        u1 = u[i1:i2, i1:i2]  # [B, B]
        if keep is None and not pattern.is_nm:
            prune_t[i1:i2] = _block_prune_mask(wt1, torch.diag(u1), pattern.sparsity)
        err = _solve_block(wt1, u1, prune_t[i1:i2], None if keep is not None else pattern)
        # lazy update [in-i2, out] -= [in-i2, B] @ [B, out], in place: no [in-i2, out] temporary
        # (43 MB for a 2048 x 5632 Linear), and the same bits as subtracting the product
        wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    wt[prune_t] = 0.0
    keep_mask = ~prune_t.T
    del prune_t
    # the transposed view, not a contiguous copy: one [out, in] float32 copy less at the peak
    return wt.T.to(weight.dtype), keep_mask.contiguous()
