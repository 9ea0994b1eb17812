"""Structured pruning, the pure part: unit scores, selection, compensation, errors, sizes.

Units are MLP channels, query heads and key/value heads (see :mod:`prunescope.families`). Every
function here takes tensors and returns tensors; nothing touches a module.

Notation: the *writer* is the projection reading the units' activations (down_proj, o_proj),
``W`` its weight as ``[out, in]``; ``x`` its input over calibration tokens (``n`` of them), with
``s = sum x`` (``[in]``), ``q = sum x^2`` (``[in]``) and ``G = sum x x^T`` (``[in, in]``).

Criteria (a higher score is kept):

- ``magnitude``: the L2 norm of every weight the unit owns (its rows of gate/up/q/k/v, its
  columns of down/o, biases included); needs no data;
- ``wanda-sp`` (An et al. 2024, the structured Wanda): ``sum_i |W_ij| * ||x_j||`` over the unit's
  columns ``j`` of the writer;
- ``flap`` (An et al. 2024, fluctuation): ``sum_i W_ij^2 * Var(x_j)`` over the unit's columns;
  a channel whose input hardly varies can be replaced by its mean (bias compensation).

A KV group (one kv head and its query heads) scores the sum of its query heads' scores (plus its
k/v weights' squared norms for ``magnitude``).

Compensation of the writer after its columns ``R`` are removed (``K`` kept):

- ``bias`` (FLAP): ``b = W[:, R] @ mean(x_R)``, the removed channels' mean contribution;
- ``lstsq``: refit ``W[:, K]`` to reproduce the dense outputs ``W x`` from ``x_K`` alone, with a
  ridge toward the original weights scaled by each column's energy (``damp * G_jj``):
  ``W'_K = (W G[:, K] + W_K L) (G_KK + L)^-1``, ``L = diag(damp * G_jj)``.
  Kept channels' activations do not change when others are removed (rows of gate/up and heads
  are independent), so ``G`` measured once on the dense layer serves both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from prunescope.errors import PrunescopeError
from prunescope.families import UnitLayout

CRITERIA = ("magnitude", "wanda-sp", "flap")
COMPENSATIONS = ("none", "bias", "lstsq")
DEFAULT_DAMP = 0.01


def per_unit(features: torch.Tensor, offset: int, count: int, width: int) -> torch.Tensor:
    """Sum a ``[features]`` vector over each unit's run: ``[count]``."""
    run = features[offset : offset + count * width]  # [count * width]
    return run.reshape(count, width).sum(1)


def unit_columns(units: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """Feature indices of ``units`` (``LongTensor[k]``): ``LongTensor[k * width]``, in unit order."""
    base = offset + units[:, None] * width  # [k, 1]
    return (base + torch.arange(width, device=units.device)[None, :]).reshape(-1)


def feature_sq_norms(weight: torch.Tensor, bias: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Squared L2 norm of each feature along ``dim`` of ``weight`` (and its bias entry): ``[features]``.

    ``bias`` is added only for output features (pass None for the input side).
    """
    w = weight.detach().float()
    norms = w.pow(2).sum(1 - dim)  # [weight.shape[dim]]
    return norms + bias.detach().float().pow(2) if bias is not None else norms


def magnitude_scores(
    layout: UnitLayout, sq_norms: Mapping[tuple[str, str], torch.Tensor]
) -> torch.Tensor:
    """Squared L2 norm of all weights each unit owns: ``[count]``.

    Args:
        layout: the units.
        sq_norms: ``(module, side) -> [features]`` from :func:`feature_sq_norms`.
    """
    total = torch.zeros(layout.count, dtype=torch.float64)
    for cut in layout.cuts:
        feats = sq_norms[(cut.module, cut.side)].double()
        total += per_unit(feats, cut.offset, layout.count, layout.width).cpu()
    return total


def column_scores(
    criterion: str, writer: torch.Tensor, sq_sum: torch.Tensor, lin_sum: torch.Tensor, tokens: int
) -> torch.Tensor:
    """Per input column ``j`` of the writer ``W`` (``[out, in]``): the ``wanda-sp`` or ``flap`` score.

    Returns:
        ``[in]`` float64 scores.
    """
    w = writer.detach().double()
    if criterion == "wanda-sp":
        return w.abs().sum(0) * sq_sum.double().clamp_min(0).sqrt().to(w.device)  # [in]
    if criterion == "flap":
        mean = lin_sum.double() / tokens  # [in]
        var = (sq_sum.double() / tokens - mean.pow(2)).clamp_min(0)  # [in]
        return w.pow(2).sum(0) * var.to(w.device)
    raise ValueError(f"column_scores handles wanda-sp and flap, not {criterion!r}")


def group_scores(q_scores: torch.Tensor, kv_count: int, kv_own: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each KV group: the sum of its query heads' scores (``[kv_count]``).

    Query head ``h`` belongs to group ``h // (heads / kv_count)``; ``kv_own`` adds what the kv
    head itself owns (its k/v weights, for magnitude).
    """
    scores = q_scores.reshape(kv_count, -1).sum(1)  # [kv_count]
    return scores + kv_own if kv_own is not None else scores


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ascending (ties: the lower index is kept)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def select_heads(
    q_scores: torch.Tensor, group_score: torch.Tensor, drop_groups: int, drop_per_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA-aware head selection: remove whole KV groups, then the same number of query heads
    from every kept group, so the layer stays a valid GQA layer.

    Args:
        q_scores: ``[heads]`` query-head scores.
        group_score: ``[kv]`` KV-group scores.
        drop_groups: KV groups to remove.
        drop_per_group: query heads to remove from each kept group.

    Returns:
        (kept query heads ``[heads']``, kept kv heads ``[kv']``), ascending.
    """
    kv = group_score.numel()
    per_group = q_scores.numel() // kv
    kept_kv = top_units(group_score, kv - drop_groups)
    kept_q = [
        g * per_group + top_units(q_scores[g * per_group : (g + 1) * per_group], per_group - drop_per_group)
        for g in kept_kv.tolist()
    ]
    return torch.cat(kept_q), kept_kv


def removed_from(kept: torch.Tensor, count: int) -> torch.Tensor:
    """The complement of ``kept`` in ``range(count)``, ascending."""
    mask = torch.ones(count, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()


def bias_compensation(writer: torch.Tensor, mean: torch.Tensor, removed_cols: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed columns' mean contribution ``W[:, R] @ mean_R`` (``[out]``, float64)."""
    w = writer.detach().double()
    return w[:, removed_cols] @ mean.double().to(w.device)[removed_cols]


def lstsq_compensation(
    writer: torch.Tensor, gram: torch.Tensor, kept_cols: torch.Tensor, damp: float = DEFAULT_DAMP
) -> torch.Tensor:
    """Refit the kept columns so ``W'_K x_K`` best reproduces ``W x`` (ridge-damped least squares).

    Minimises ``sum_t ||W'_K x_K,t - W x_t||^2 + sum_j lambda_j ||W'_:j - W_:j||^2`` over kept
    columns ``j``, with ``lambda_j = damp * G_jj``: the ridge pulls toward the original weights
    (so in-sample the refit is never worse than no compensation) and scales with each column's
    own energy (so a few massive-activation channels do not swamp the damping of the rest).
    Solution: ``W'_K = (W G[:, K] + W_K L) (G_KK + L)^-1`` with ``L = diag(lambda)``.

    Args:
        writer: ``[out, in]`` dense writer weight.
        gram: ``[in, in]`` ``sum x x^T`` over calibration tokens.
        kept_cols: ``LongTensor[k]`` kept input columns.
        damp: the ridge as a fraction of each column's energy.

    Returns:
        ``[out, k]`` float64 new weights of the kept columns.
    """
    w = writer.detach().double()
    g = gram.double().to(w.device)
    kept = kept_cols.to(w.device)
    g_kk = g[kept][:, kept]  # [k, k]
    ridge = damp * g_kk.diagonal().clamp_min(1e-12 * g_kk.diagonal().max().clamp_min(1e-30))  # [k]
    lhs = g_kk + torch.diag(ridge)
    rhs = g[kept] @ w.T + ridge[:, None] * w[:, kept].T  # [k, out]
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:  # near-singular: an SVD-based solve on the CPU (CUDA's lstsq assumes full rank)
        return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.T.to(w.device)
    return torch.cholesky_solve(rhs, chol).T  # [out, k]


def output_error(
    writer: torch.Tensor,
    gram: torch.Tensor,
    lin_sum: torch.Tensor,
    tokens: int,
    kept_cols: torch.Tensor,
    new_kept: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> float:
    """Relative squared error of the writer's outputs on the calibration tokens after pruning:
    ``sum_t ||W' x_t + b - W x_t||^2 / sum_t ||W x_t||^2``, computed from ``G`` and ``s`` alone.

    ``new_kept`` (``[out, k]``) are the kept columns' new weights (unchanged when None) and
    ``bias`` the added bias (none when None). With ``D = W'_full - W``:
    ``error = tr(D G D^T) + 2 b^T D s + n ||b||^2``.
    """
    w = writer.detach().double()
    g = gram.double().to(w.device)
    d = -w.clone()  # [out, in]: removed columns lose all their weight
    d[:, kept_cols] = 0.0 if new_kept is None else new_kept.double().to(w.device) - w[:, kept_cols]
    err = ((d @ g) * d).sum()
    if bias is not None:
        b = bias.double().to(w.device)
        err = err + 2 * b @ (d @ lin_sum.double().to(w.device)) + tokens * b @ b
    dense = ((w @ g) * w).sum().clamp_min(1e-30)
    return float(err / dense)


def block_influence_sum(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """ShortGPT's block influence summed over tokens: ``sum_t (1 - cos(x_in_t, x_out_t))``.

    Args:
        x_in, x_out: ``[..., hidden]`` inputs and outputs of one decoder layer.

    Returns:
        (sum over tokens, number of tokens); their ratio is the layer's block influence.
    """
    a = x_in.reshape(-1, x_in.shape[-1]).float()  # [tokens, hidden]
    b = x_out.reshape(-1, x_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)  # [tokens]
    return float((1.0 - cos).double().sum()), a.shape[0]


def check_multiple(multiple: int, count: int, what: str) -> None:
    """``--multiple-of`` must be between 1 and the width it rounds."""
    if multiple < 1 or multiple > count:
        raise PrunescopeError(f"--multiple-of {multiple} must be between 1 and the {what} width ({count})")


def kept_width(count: int, fraction: float, multiple: int, what: str) -> int:
    """Units kept when removing ``fraction`` of ``count``, rounded to the nearest multiple
    (halves round up, so the kept width never falls below what was asked by rounding a tie).

    Raises:
        PrunescopeError: the rounded width keeps every unit or none, or ``multiple`` exceeds
            ``count``.
    """
    check_multiple(multiple, count, what)
    if not 0.0 < fraction < 1.0:
        raise PrunescopeError(f"the fraction of {what} to remove must be in (0, 1), got {fraction}")
    keep = multiple * math.floor(count * (1.0 - fraction) / multiple + 0.5)
    if keep >= count:
        raise PrunescopeError(
            f"removing {fraction:g} of {count} {what} rounds to {keep} kept (a multiple of "
            f"{multiple}): nothing would be removed; raise the fraction or lower --multiple-of"
        )
    if keep <= 0:
        raise PrunescopeError(
            f"removing {fraction:g} of {count} {what} rounds to 0 kept (a multiple of {multiple}): "
            f"every unit would be removed; lower the fraction or --multiple-of"
        )
    return keep
