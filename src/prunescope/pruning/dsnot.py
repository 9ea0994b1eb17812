"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): refine a keep-mask, no training.

Pure: ``refine(W, keep, E[x], E[x^2]) -> keep'``; nothing here touches a module, no weight changes.

Given a sparse Linear layer (a keep-mask from Wanda, SparseGPT, magnitude, ...), DSnoT swaps
weights row by row: it revives one pruned weight and prunes one kept weight, so every row keeps
its sparsity (and every group of ``m`` its N:M count), wherever the swap shrinks the expected
reconstruction error of the row's output. With ``D_ij = W_ij E[x_j]`` the error of row ``i`` is

    e_i = E[(W_i - W'_i) x] = sum over pruned j of D_ij                      (row_error)

Each cycle, for every row still active (``s_i = sign`` of the row's initial ``e_i``):

- grow: among the initially pruned weights with ``sign(D_ij) = s_i`` (reviving them moves
  ``e_i`` towards 0), the one with the largest ``|D_ij| / Var[x_j]^p``: a large expected
  reduction that varies little from input to input;
- prune: among the initially kept weights with ``sign(D_ij) = -s_i`` (removing them also moves
  ``e_i`` towards 0), the one with the smallest Wanda score ``|W_ij| ||x_j||``. For N:M the
  partner must lie in the revived weight's group of ``m``; if that group holds no kept weight of
  the right sign, the group's smallest Wanda score stands in (the reference's N:M rule);
- stop the row for good when ``|e_i| <= update_threshold``, when the swap would flip the sign of
  ``e_i`` or not shrink ``|e_i|``, or when a candidate list runs out; stop everything after
  ``max_cycles`` cycles. So ``|e_i|`` never grows and each weight changes at most once.

Where this was confirmed: the paper's abstract (arXiv 2310.08915: pruning and growing by the
anticipated reduction of the reconstruction error, growing also by the variance of the input)
and the authors' code (github.com/zyxxmu/DSnoT, ``lib/prune.py`` and ``lib/layerwrapper.py``;
README defaults ``--max_cycle_time 50 --update_threshold 0.1 --pow_of_var_regrowing 1``).
The full paper text was not available here. Differences from that code, all deliberate:

- its error is ``W * sum_tokens(x) / n_sequences``: the mean times the sequence length (2048 in
  the paper's runs), so its threshold 0.1 is ``0.1 / 2048`` on the mean scale used here;
- candidate lists hold only weights of the right sign (the code walks sorted lists that can run
  into other weights after many cycles);
- for N:M the code prunes the group's smallest Wanda score whatever its sign, which can make
  ``|e_i|`` grow; here the right sign is preferred and a swap must shrink ``|e_i|``;
- the variance is ``E[x^2] - E[x]^2`` over all calibration tokens (the code averages
  per-sequence variances), floored at ``1e-12`` so a constant input does not divide by zero.
"""

from __future__ import annotations

import logging

import torch

from prunescope.pruning import scoring

log = logging.getLogger(__name__)

DEFAULT_MAX_CYCLES = 50  # reference README: --max_cycle_time 50
REFERENCE_SEQUENCE_LENGTH = 2048  # tokens per calibration sequence in the reference runs
# Reference README: --update_threshold 0.1, on mean * sequence length; here on the mean.
DEFAULT_UPDATE_THRESHOLD = 0.1 / REFERENCE_SEQUENCE_LENGTH
DEFAULT_VARIANCE_POWER = 1.0  # reference README: --pow_of_var_regrowing 1
_VARIANCE_FLOOR = 1e-12


def row_error(
    weight: torch.Tensor, keep: torch.Tensor, input_mean: torch.Tensor
) -> torch.Tensor:
    """Expected reconstruction error ``e_i = sum_j (W_ij - W'_ij) E[x_j]`` of every output row.

    ``W'`` is ``weight`` masked by ``keep``, so only pruned weights contribute. DSnoT drives
    ``|e_i|`` towards 0. Returns float32 ``[out]``.
    """
    _check_shapes(weight, keep, {"input_mean": input_mean})
    contrib = _contributions(weight, input_mean)  # [out, in]
    return contrib.masked_fill(keep.to(contrib.device), 0.0).sum(dim=1)  # [out]


def refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    input_mean: torch.Tensor,
    input_sq_mean: torch.Tensor,
    n_m: tuple[int, int] | None = None,
    max_cycles: int = DEFAULT_MAX_CYCLES,
    update_threshold: float = DEFAULT_UPDATE_THRESHOLD,
    variance_power: float = DEFAULT_VARIANCE_POWER,
) -> torch.Tensor:
    """DSnoT: swap pruned and kept weights per row to shrink the expected output error.

    Args:
        weight: ``[out, in]`` dense Linear weight (any float dtype; maths in float32).
        keep: ``[out, in]`` bool keep-mask to refine (True = kept), e.g. from Wanda.
        input_mean: ``[in]`` mean of each input feature over the calibration tokens.
        input_sq_mean: ``[in]`` mean of its square; gives ``||x_j||`` (Wanda) and the variance.
        n_m: ``(n, m)`` when ``keep`` is N:M (``n`` pruned in every ``m`` consecutive inputs):
            swaps then stay inside a group, so the pattern holds.
        max_cycles: at most this many swaps per row (0 returns the mask unchanged).
        update_threshold: a row stops once ``|e_i|`` (the scale of :func:`row_error`) is at or
            below this. The default is the paper's 0.1 moved to the mean scale (module doc).
        variance_power: ``p`` in the growing score ``|W_ij E[x_j]| / Var[x_j]^p`` (0: no
            variance term).

    Returns:
        A new bool ``[out, in]`` mask on ``weight``'s device with the same number of kept
        weights in every row (and in every group of ``m`` for N:M).
    """
    _check_shapes(weight, keep, {"input_mean": input_mean, "input_sq_mean": input_sq_mean})
    _check_options(keep, n_m, max_cycles, update_threshold, variance_power)
    if max_cycles == 0 or weight.shape[1] == 0:
        return keep.clone()
    dev = weight.device
    keep = keep.to(dev)
    mean = input_mean.detach().to(dev, torch.float32)  # [in]
    sq_mean = input_sq_mean.detach().to(dev, torch.float32)  # [in]
    contrib = _contributions(weight, mean)  # [out, in]
    error = contrib.masked_fill(keep, 0.0).sum(dim=1)  # [out]
    sign = torch.sign(error)  # [out]
    variance = (sq_mean - mean * mean).clamp_min(_VARIANCE_FLOOR)  # [in]
    cycles = min(max_cycles, weight.shape[1])
    grow_idx, grow_ok = _grow_candidates(contrib, keep, sign, variance, variance_power, cycles)
    wanda = scoring.wanda(weight, sq_mean)  # [out, in]
    if n_m is None:
        prune_idx, prune_ok = _prune_candidates(contrib, keep, sign, wanda, cycles)
        return _swap_rows(keep, contrib, error, grow_idx, grow_ok, prune_idx, prune_ok,
                          update_threshold)
    return _swap_in_groups(keep, contrib, error, wanda, grow_idx, grow_ok, n_m[1],
                           update_threshold)


def _contributions(weight: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """``D_ij = W_ij E[x_j]`` in float32: each weight's share of the row's expected output."""
    mean = input_mean.detach().to(weight.device, torch.float32)  # [in]
    return weight.detach().float() * mean[None, :]  # [out, in]


def _grow_candidates(
    contrib: torch.Tensor,
    keep: torch.Tensor,
    sign: torch.Tensor,
    variance: torch.Tensor,
    power: float,
    cycles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``cycles`` best weights to revive, best first, and which of them are real.

    Candidates: pruned weights whose ``D_ij`` has the sign of the row's error (reviving one
    subtracts ``D_ij``); ranked by ``|D_ij| / Var[x_j]^power``. Returns ``[out, cycles]`` indices
    and a bool ``[out, cycles]`` that is False past the end of a row's candidates.
    """
    usable = ~keep & (torch.sign(contrib) == sign[:, None])  # [out, in]
    score = contrib.abs() / variance.pow(power)[None, :]  # [out, in]
    score = score.masked_fill(~usable, float("-inf"))
    best = torch.topk(score, cycles, dim=1, largest=True, sorted=True)
    return best.indices, best.values > float("-inf")  # [out, cycles] x2


def _prune_candidates(
    contrib: torch.Tensor,
    keep: torch.Tensor,
    sign: torch.Tensor,
    wanda: torch.Tensor,
    cycles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``cycles`` kept weights to prune first, and which of them are real.

    Candidates: kept weights whose ``D_ij`` has the opposite sign of the row's error (pruning
    one adds ``D_ij``); smallest Wanda score first. Shapes as in :func:`_grow_candidates`.
    """
    usable = keep & (torch.sign(contrib) == -sign[:, None])  # [out, in]
    score = wanda.masked_fill(~usable, float("inf"))  # [out, in]
    best = torch.topk(score, cycles, dim=1, largest=False, sorted=True)
    return best.indices, best.values < float("inf")  # [out, cycles] x2


def _swap_rows(
    keep: torch.Tensor,
    contrib: torch.Tensor,
    error: torch.Tensor,
    grow_idx: torch.Tensor,
    grow_ok: torch.Tensor,
    prune_idx: torch.Tensor,
    prune_ok: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Unstructured DSnoT: cycle ``k`` swaps the ``k``-th grow and prune candidates of a row.

    The candidate lists do not depend on earlier swaps (the error keeps its sign), so all
    cycles are evaluated at once: the error after each cycle is a running sum, and a row takes
    the swaps before its first refused one.
    """
    step = contrib.gather(1, prune_idx) - contrib.gather(1, grow_idx)  # [out, cycles]
    path = torch.cumsum(torch.cat([error[:, None], step], dim=1), dim=1)  # [out, cycles + 1]
    before, after = path[:, :-1], path[:, 1:]  # [out, cycles] x2
    ok = grow_ok & prune_ok & (before.abs() > threshold)
    ok &= (torch.sign(after) == torch.sign(error)[:, None]) & (after.abs() < before.abs())
    taken = torch.cumprod(ok.to(torch.int8), dim=1).bool()  # [out, cycles]
    rows, cols = taken.nonzero(as_tuple=True)  # [swaps] x2
    out = keep.clone()
    out[rows, grow_idx[rows, cols]] = True
    out[rows, prune_idx[rows, cols]] = False
    log.debug("DSnoT: %d swaps in %d of %d rows", rows.numel(), int(taken[:, 0].sum()),
              keep.shape[0])
    return out


def _swap_in_groups(
    keep: torch.Tensor,
    contrib: torch.Tensor,
    error: torch.Tensor,
    wanda: torch.Tensor,
    grow_idx: torch.Tensor,
    grow_ok: torch.Tensor,
    m: int,
    threshold: float,
) -> torch.Tensor:
    """N:M DSnoT: each cycle prunes a partner from the revived weight's own group of ``m``.

    A partner depends on earlier swaps in the same group, so cycles run one after another,
    each over all rows at once (``[out, m]`` work per cycle).
    """
    out = keep.clone()
    error = error.clone()
    sign = torch.sign(error)  # [out]
    active = torch.ones_like(error, dtype=torch.bool)  # [out]
    rows = torch.arange(keep.shape[0], device=keep.device)  # [out]
    offsets = torch.arange(m, device=keep.device)  # [m]
    for k in range(grow_idx.shape[1]):
        grow = grow_idx[:, k]  # [out]
        group = (grow - grow % m)[:, None] + offsets[None, :]  # [out, m]
        prune, found = _group_partner(out, keep, contrib, wanda, sign, group)  # [out] x2
        after = error + (contrib[rows, prune] - contrib[rows, grow])  # [out]
        active &= grow_ok[:, k] & found & (error.abs() > threshold)
        active &= (torch.sign(after) == sign) & (after.abs() < error.abs())
        if not bool(active.any()):
            break
        hit = rows[active]
        out[hit, grow[active]] = True
        out[hit, prune[active]] = False
        error = torch.where(active, after, error)
    return out


def _group_partner(
    current: torch.Tensor,
    initial: torch.Tensor,
    contrib: torch.Tensor,
    wanda: torch.Tensor,
    sign: torch.Tensor,
    group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight to prune in each row's ``group`` ``[out, m]`` of columns, and whether one exists.

    Eligible: kept now and kept initially (a revived weight is never pruned again). Preferred:
    those whose ``D_ij`` has the sign opposite to the row's error; otherwise any eligible one.
    Among them the smallest Wanda score. Returns column indices ``[out]`` and a bool ``[out]``.
    """
    eligible = current.gather(1, group) & initial.gather(1, group)  # [out, m]
    opposite = eligible & (torch.sign(contrib.gather(1, group)) == -sign[:, None])  # [out, m]
    pool = torch.where(opposite.any(dim=1, keepdim=True), opposite, eligible)  # [out, m]
    score = wanda.gather(1, group).masked_fill(~pool, float("inf"))  # [out, m]
    pick = score.argmin(dim=1, keepdim=True)  # [out, 1]
    return group.gather(1, pick).squeeze(1), pool.any(dim=1)


def _check_shapes(
    weight: torch.Tensor, keep: torch.Tensor, stats: dict[str, torch.Tensor]
) -> None:
    """Raise ValueError naming the shapes when the tensors do not describe one Linear layer."""
    if weight.ndim != 2:
        raise ValueError(f"DSnoT needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if keep.shape != weight.shape:
        raise ValueError(
            f"keep-mask of shape {tuple(keep.shape)} does not match weight "
            f"{tuple(weight.shape)}; expected the same shape"
        )
    expected = (weight.shape[1],)
    for name, stat in stats.items():
        if stat.shape != expected:
            raise ValueError(
                f"{name} of shape {tuple(stat.shape)} does not match weight "
                f"{tuple(weight.shape)}; expected [{weight.shape[1]}]"
            )


def _check_options(
    keep: torch.Tensor,
    n_m: tuple[int, int] | None,
    max_cycles: int,
    update_threshold: float,
    variance_power: float,
) -> None:
    """Raise ValueError for a non-bool mask, bad counts, or a mask that breaks its N:M pattern."""
    if keep.dtype != torch.bool:
        raise ValueError(f"keep-mask must be torch.bool, got {keep.dtype}")
    if max_cycles < 0 or update_threshold < 0 or variance_power < 0:
        raise ValueError(
            f"max_cycles, update_threshold and variance_power must be >= 0, got "
            f"{max_cycles}, {update_threshold}, {variance_power}"
        )
    if n_m is None:
        return
    n, m = n_m
    if not 0 < n < m or keep.shape[1] % m:
        raise ValueError(
            f"N:M {n}:{m} needs 0 < N < M and in a multiple of M; got keep-mask "
            f"of shape {tuple(keep.shape)}"
        )
    kept = keep.reshape(keep.shape[0], -1, m).sum(dim=2)  # [out, in/m]
    bad = int((kept != m - n).sum())
    if bad:
        raise ValueError(
            f"keep-mask of shape {tuple(keep.shape)} is not {n}:{m}: {bad} groups of {m} "
            f"do not keep exactly {m - n}"
        )
