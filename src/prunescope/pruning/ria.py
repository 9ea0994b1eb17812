"""RIA (Zhang et al., "Plug-and-Play", ICLR 2024): a pruning score and an N:M channel permutation.

Pure tensor functions; nothing here touches a module.

- :func:`score`: Relative Importance and Activations, ``RI_ij * ||X_j||_2 ** a``.
- :func:`permute_for_nm`: a permutation of the input channels that raises the total score an N:M
  mask keeps (the paper's "channel permutation": heuristic channel reallocation, then linear sum
  assignment refinement).
- :func:`nm_keep_mask_permuted`: the N:M keep-mask chosen in permuted column order, mapped back to
  the original column order.
- :func:`kept_score`: the total score a keep-mask keeps.

A permuted N:M mask is N:M in the *permuted* column order, not in the original one. N:M hardware
kernels (2:4 sparse tensor cores) need N:M in the stored order, so a model pruned with such a mask
only runs on them if the permutation is also applied to the weight's columns and to the outputs of
whatever produces this layer's input (the previous layer's rows, or a gather of the activations).
Applied to the unpermuted weight, the mask is a valid unstructured mask of the same sparsity that
keeps more score than the direct N:M mask; that is how it is offered here (a mask-quality option).
"""

from __future__ import annotations

import logging

import torch

from prunescope.pruning import masks

log = logging.getLogger(__name__)


def score(weight: torch.Tensor, input_sq_sum: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA score: ``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a``.

    The relative importance ``RI_ij`` divides each magnitude by the L1 norm of its output row
    (all inputs of output ``i``) and by that of its input column (all outputs fed by input ``j``),
    so a weight counts for what it is worth to both neurons it connects; this is the formula of
    the authors' reference code (``lib/prune.py``, ``prune_method == "ria"``). ``RI`` does not
    change when ``W`` is scaled by a positive constant, and scaling ``input_sq_sum`` by ``c``
    scales every score by ``c ** (a / 2)``, so masks do not change either way.

    ``a`` weighs the activations: ``a = 1`` is Wanda's activation factor, ``a = 0`` is pure RI;
    ``a = 0.5`` (the default of the authors' code, ``--a``) takes the square root of the input
    norm, so outlier channels weigh less than in Wanda.

    Comparison group: in the authors' code the unstructured RIA mask compares scores across the
    whole layer (one threshold per matrix; per-output-row comparison is an opt-in flag there,
    labelled "Wanda's tactic"); RI's row and column normalisation is what makes scores of
    different rows comparable. For N:M the group is, as always, each ``m`` inputs of a row.

    A row or column of all-zero weights has a zero L1 norm; its entries score 0 (not NaN).

    Args:
        weight: ``[out, in]`` Linear weight.
        input_sq_sum: ``[in]`` sum over calibration tokens of the squared input ``x_j^2`` (its
            square root is the input's L2 norm; a mean gives the same masks).
        a: exponent of the input norm, ``a >= 0``.

    Returns:
        ``[out, in]`` float32 scores.
    """
    if weight.ndim != 2:
        raise ValueError(f"RIA needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(
            f"input statistics of shape {tuple(input_sq_sum.shape)} do not match weight "
            f"{tuple(weight.shape)}; expected [{weight.shape[1]}]"
        )
    if not a >= 0:  # also rejects NaN
        raise ValueError(f"RIA exponent a must be >= 0, got {a}")
    mag = weight.detach().float().abs()  # [out, in]
    row_l1 = mag.sum(dim=1, keepdim=True)  # [out, 1]
    col_l1 = mag.sum(dim=0, keepdim=True)  # [1, in]
    # an all-zero row/column has zero entries: dividing them by 1 keeps them 0
    ri = mag / row_l1.masked_fill(row_l1 == 0, 1.0) + mag / col_l1.masked_fill(col_l1 == 0, 1.0)
    act = input_sq_sum.detach().float().clamp_min(0).sqrt().pow(a)  # [in]; 0 ** 0 = 1
    return ri * act[None, :]  # [out, in]


def kept_score(scores: torch.Tensor, keep: torch.Tensor) -> float:
    """Total of ``scores`` where ``keep`` is True, summed in float64."""
    if scores.shape != keep.shape:
        raise ValueError(
            f"keep-mask of shape {tuple(keep.shape)} does not match scores {tuple(scores.shape)}"
        )
    return float(scores.detach().double()[keep.to(torch.bool)].sum())


def kept_nm_score(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """Score an N:M mask (``n`` pruned per ``m``) keeps on ``scores[:, perm]``: top ``m - n``."""
    rows, cols = scores.shape
    groups = scores[:, perm].double().reshape(rows, cols // m, m)  # [out, G, m]
    return float(groups.topk(m - n, dim=-1).values.sum())


def _reallocate(col_score: torch.Tensor, m: int) -> torch.Tensor:
    """Heuristic channel reallocation: every group of ``m`` gets one channel per score band.

    Channels sorted by ``col_score`` (ascending) are cut into ``m`` bands of ``G = in / m``;
    position ``k`` of group ``g`` takes the ``g``-th channel of band ``k``, counted from the low end
    for even ``k`` and from the high end for odd ``k`` (a snake), so that strong channels are spread
    over the groups instead of competing inside one.
    """
    order = torch.argsort(col_score, stable=True)  # [in]
    bands = order.reshape(m, -1).clone()  # [m, G]
    bands[1::2] = bands[1::2].flip(-1)
    return bands.t().reshape(-1)  # [in]; position g*m + k holds bands[k, g]


def _assignment_gain(rest: torch.Tensor, cand: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``S[g, c]``: score an N:M mask keeps in group ``g`` if channel ``c`` completes it.

    ``rest`` ``[out, G, m-1]`` are the scores of the ``m - 1`` channels each group keeps,
    ``cand`` ``[out, G]`` those of the candidate channels. Per row, the ``m - n`` best of
    ``rest ∪ {x}`` are the ``m - n - 1`` best of ``rest`` plus ``max(x, t)``, where ``t`` is the
    ``(m - n)``-th best of ``rest``; and ``sum_rows max(x, t) = (sum t + sum x + ||x - t||_1) / 2``,
    an L1 distance, so ``S`` costs one ``cdist`` and no ``[out, G, G, m]`` temporary.
    """
    top = rest.topk(m - n, dim=-1).values  # [out, G, m-n], descending
    base = top[..., :-1].sum(dim=(0, 2))  # [G]
    t = top[..., -1].t()  # [G, out]
    x = cand.t()  # [G, out]
    l1 = torch.cdist(t[None], x[None], p=1)[0]  # [G, G]
    return base[:, None] + 0.5 * (t.sum(1)[:, None] + x.sum(1)[None, :] + l1)


def _lsa_step(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """Reassign the channels at position ``k`` of every group by linear sum assignment.

    The other ``m - 1`` channels of each group stay; the ``G`` channels at position ``k`` are
    redistributed over the groups to maximise the kept score. The current assignment is one of
    the candidates, so the kept score never decreases (up to float rounding).
    """
    # deferred: scipy.optimize is slow to import and only needed here
    from scipy.optimize import linear_sum_assignment

    rows = scores.shape[0]
    grouped = perm.reshape(-1, m)  # [G, m]
    others = [j for j in range(m) if j != k]
    s = scores.double()
    rest = s[:, grouped[:, others]]  # [out, G, m-1]
    cand = s[:, grouped[:, k]]  # [out, G]
    gain = _assignment_gain(rest.reshape(rows, -1, m - 1), cand, n, m)  # [G, G]
    _, chosen = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
    out = grouped.clone()
    out[:, k] = grouped[torch.as_tensor(chosen, device=perm.device), k]
    return out.reshape(-1)


def _refine(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, blocks: int) -> torch.Tensor:
    """One pass of :func:`_lsa_step` over the ``m`` positions, within each block of groups."""
    parts = list(perm.reshape(-1, m).tensor_split(blocks))  # blocks of [G_b, m]
    for k in range(m):
        for b, part in enumerate(parts):
            sub = part.reshape(-1)  # [G_b * m] channel ids
            local = _lsa_step(scores[:, sub], torch.arange(sub.numel(), device=sub.device), n, m, k)
            parts[b] = sub[local].reshape(-1, m)
    return torch.cat(parts).reshape(-1)


def permute_for_nm(
    scores: torch.Tensor, n: int, m: int, *, rounds: int = 1, blocks: int = 1
) -> torch.Tensor:
    """A permutation ``perm`` of the input channels so that N:M on ``scores[:, perm]`` keeps more.

    RIA's channel permutation (Zhang et al. 2024), following the authors' reference code:

    1. heuristic channel reallocation: channels sorted by their column sum of ``scores`` (the
       code's default ``--importance_score sum``) are dealt out so that every group of ``m``
       holds one channel of each score band (see :func:`_reallocate`);
    2. linear sum assignment (``--lsa``): for each position ``k < m`` in turn, the channels at
       position ``k`` of all groups are reassigned to groups by
       ``scipy.optimize.linear_sum_assignment`` on the exact kept-score gain matrix;
       ``rounds`` repeats the ``m`` steps (the paper makes one pass), ``blocks > 1`` restricts the
       reassignment to contiguous blocks of groups to bound the ``O(G^2 out + G^3)`` cost (the
       code's ``--fast``).

    Each assignment step never lowers the kept score, but the reallocation can; the result is
    compared with the identity and the identity is returned when it keeps at least as much, so
    N:M on ``scores[:, perm]`` never keeps less than N:M on ``scores``.

    Args:
        scores: ``[out, in]`` importance (non-negative, e.g. :func:`score`); ``in % m == 0``.
        n: entries pruned per group of ``m`` (as in ``masks.nm_keep_mask``), ``0 < n < m``.
        m: group size along the input dimension.
        rounds: passes of assignment refinement, ``>= 0`` (0: reallocation only).
        blocks: number of blocks of groups for the assignment, ``1 <= blocks <= in / m``.

    Returns:
        ``LongTensor [in]`` on ``scores.device``: column ``p`` of the permuted order is original
        column ``perm[p]``.
    """
    masks.check_nm(scores, n, m)
    n_groups = scores.shape[1] // m
    if rounds < 0 or not 1 <= blocks <= n_groups:
        raise ValueError(
            f"need rounds >= 0 and 1 <= blocks <= {n_groups} (in / m for scores of shape "
            f"{tuple(scores.shape)}), got rounds={rounds}, blocks={blocks}"
        )
    s = scores.detach()
    perm = _reallocate(s.double().sum(dim=0), m)  # [in]
    for _ in range(rounds):
        perm = _refine(s, perm, n, m, blocks)
    identity = torch.arange(s.shape[1], device=s.device)
    before, after = kept_nm_score(s, identity, n, m), kept_nm_score(s, perm, n, m)
    log.debug("N:M %d:%d kept score: identity %.6g, permuted %.6g", n, m, before, after)
    return perm if after > before else identity


def nm_keep_mask_permuted(
    scores: torch.Tensor, n: int, m: int, *, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """N:M keep-mask chosen on ``scores[:, perm]``, returned in the original column order.

    ``keep[:, perm[p]]`` is the permuted mask's column ``p``, so ``keep`` applies to the unpermuted
    weight. It is N:M in the permuted order (each group ``perm[g*m:(g+1)*m]`` keeps ``m - n``
    per row), generally not in the original order: see the module docstring for what running it
    on N:M hardware needs.

    Args:
        scores: ``[out, in]`` importance; ``in % m == 0``.
        n: entries pruned per group of ``m``.
        m: group size.
        perm: ``LongTensor [in]`` from :func:`permute_for_nm`; computed with its defaults if None.

    Returns:
        ``BoolTensor [out, in]``, True where kept.
    """
    masks.check_nm(scores, n, m)
    if perm is None:
        perm = permute_for_nm(scores, n, m)
    cols = scores.shape[1]
    if perm.shape != (cols,) or not torch.equal(
        torch.sort(perm.cpu()).values, torch.arange(cols)
    ):
        raise ValueError(
            f"perm must be a permutation of range({cols}), got shape {tuple(perm.shape)}"
        )
    perm = perm.to(scores.device)
    keep_permuted = masks.nm_keep_mask(scores.detach()[:, perm], n, m)  # [out, in], permuted order
    keep = torch.empty_like(keep_permuted)
    keep[:, perm] = keep_permuted
    return keep
