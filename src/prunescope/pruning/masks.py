"""Pure functions from importance scores to boolean keep-masks (True = keep, as torch's mask 1).

Nothing here touches a module: callers pass score tensors and get masks back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


_DIGIT_BITS = 16  # radix digit: 65,536 histogram bins per pass
_KEY_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _common_float_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The floating dtype every score is compared in (integer scores go to float64)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"scores must be real numbers, got dtype {dtype}")
    return dtype if dtype.is_floating_point else torch.float64


def sortable_keys(scores: torch.Tensor, dtype: torch.dtype, magnitude: bool) -> torch.Tensor:
    """Signed integers ordered exactly like ``scores`` (or ``|scores|`` when ``magnitude``).

    The IEEE-754 bit pattern of a non-negative float, read as a signed integer of the same
    width, grows with the value; a negative float is mapped by flipping its non-sign bits. NaN
    counts as the largest value, as in ``torch.topk``. Returns a new tensor, same shape.
    """
    x = scores.detach()
    if x.dtype != dtype:
        x = x.to(dtype)
    int_dtype = _KEY_DTYPES[dtype.itemsize]
    low_bits = (1 << (8 * dtype.itemsize - 1)) - 1  # all bits but the sign
    if magnitude:
        keys = x.view(int_dtype) & low_bits  # clearing the sign bit is |x|, NaN included
    else:
        keys = x.view(int_dtype).clone()
        keys[keys < 0] ^= low_bits
        keys[torch.isnan(x)] = low_bits
    return keys if dtype.itemsize >= 4 else keys.to(torch.int32)  # room for 16-bit digits


def _digit_(keys: torch.Tensor, shift: int, top: bool) -> torch.Tensor:
    """One radix digit of ``keys``, in [0, 2**16), computed in place (``keys`` is a temporary)."""
    keys >>= shift  # arithmetic shift: the top digit keeps the sign, in [-2**15, 2**15)
    if top:
        keys += 1 << (_DIGIT_BITS - 1)
    else:
        keys &= (1 << _DIGIT_BITS) - 1
    return keys


def _prefix_matches(keys: torch.Tensor, shift: int, prefix: int | None) -> torch.Tensor | None:
    """Bool [numel] of the keys whose bits above ``shift`` equal ``prefix`` (None: all do)."""
    if prefix is None:
        return None
    return (keys >> shift).reshape(-1) == prefix


class _Scores:
    """Score tensors read lazily as sortable keys, one tensor at a time (never all at once)."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        magnitude: bool,
        active: Sequence[torch.Tensor | None] | None,
    ) -> None:
        self.tensors = list(tensors)
        self.dtype = _common_float_dtype(self.tensors)
        self.nbits = 8 * self.dtype.itemsize
        self.magnitude = magnitude
        self.active = list(active) if active is not None else [None] * len(self.tensors)
        if len(self.active) != len(self.tensors):
            raise ValueError(f"{len(self.active)} active masks for {len(self.tensors)} score tensors")

    def keys(self, i: int) -> torch.Tensor:
        return sortable_keys(self.tensors[i], self.dtype, self.magnitude)

    def histogram(self, shift: int, prefix: int | None) -> torch.Tensor:
        """Counts [2**16] of the next digit among active keys whose higher bits equal ``prefix``."""
        nbins = 1 << _DIGIT_BITS
        total = torch.zeros(nbins, dtype=torch.int64)
        for i in range(len(self.tensors)):
            keys = self.keys(i)
            sel = _prefix_matches(keys, shift + _DIGIT_BITS, prefix)
            act = self.active[i]
            if act is not None:
                act = act.reshape(-1).to(device=keys.device, dtype=torch.bool)
                sel = act if sel is None else sel & act
            flat = keys.reshape(-1) if sel is None else keys.reshape(-1)[sel]  # [m]
            digits = _digit_(flat, shift, top=prefix is None)  # [m], consumes flat
            total += torch.bincount(digits, minlength=nbins).cpu()
        return total


def _threshold(scores: _Scores, n_prune: int) -> tuple[int, int]:
    """Radix selection: the key ``T`` of the ``n_prune``-th smallest active score.

    Returns ``(T, n_tied)``: every active key below ``T`` is pruned, plus the first ``n_tied``
    active keys equal to ``T`` (in tensor order, then row-major order).
    """
    prefix: int | None = None
    below = 0  # active keys known to be smaller than the current prefix
    for shift in range(scores.nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        counts = scores.histogram(shift, prefix)  # [65536]
        cum = torch.cumsum(counts, 0)
        need = n_prune - below  # 1 <= need <= counts.sum()
        d = int(torch.searchsorted(cum, torch.tensor(need), right=False))
        below += int(cum[d - 1]) if d > 0 else 0
        top = prefix is None
        value = d - (1 << (_DIGIT_BITS - 1)) if top else d  # undo the offset of the top digit
        prefix = value if top else (prefix << _DIGIT_BITS) | d
    assert prefix is not None
    return prefix, n_prune - below


def keep_smallest(
    scores: Sequence[torch.Tensor],
    n_prune: int,
    *,
    magnitude: bool = False,
    active: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Keep-masks that prune the ``n_prune`` smallest scores across all tensors together.

    The same selection as concatenating every score and taking ``topk(largest=False)``, done
    without concatenating: a radix selection on the scores' bit patterns (16 bits per pass,
    one ``bincount`` per tensor), then one pass that writes each mask. Extra memory is the masks
    plus a few temporaries of the largest single tensor, whatever the number of tensors.
    Exact: exactly ``n_prune`` entries are pruned, ties at the threshold included (the first
    tied entries in order are pruned, where ``topk`` picks tied entries in an unspecified order).

    Args:
        scores: importance scores, one tensor per pruned parameter (any real dtype; float16,
            bfloat16, float32 and float64 are compared exactly, integers as float64).
        n_prune: how many active entries to prune in total, ``0 <= n_prune <= n_active``.
        magnitude: compare ``|score|`` instead of ``score`` (computed on the fly, no copy kept).
        active: optional bool masks (None = all active); inactive entries are never counted
            nor selected and stay False in the returned masks.

    Returns:
        One contiguous ``BoolTensor`` per score tensor, same shape, True where kept.
    """
    if not scores:
        raise ValueError("no score tensors given")
    src = _Scores(scores, magnitude, active)
    n_active = sum(
        s.numel() if a is None else int(a.sum()) for s, a in zip(src.tensors, src.active)
    )
    if not 0 <= n_prune <= n_active:
        raise ValueError(f"n_prune must be in [0, {n_active}], got {n_prune}")
    if n_prune == 0:
        return [_start_mask(s, a) for s, a in zip(src.tensors, src.active)]
    # The masks are allocated before any temporary: interleaving long-lived masks with
    # short-lived temporaries fragments the C heap, which then holds far more than the masks.
    out = [torch.empty(s.shape, dtype=torch.bool, device=s.device) for s in src.tensors]
    with one_cpu_thread():
        _write_masks(src, n_prune, out)
    return out


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch CPU ops on one intra-op thread inside the block; restore the count after.

    Per-tensor selection is thousands of short, memory-bound ops (~1 M elements each). Their
    intra-op parallelism gains little, and on a busy machine every op waits at an OpenMP barrier
    for a descheduled thread: measured 6x slower with 2 threads than with 1 under load.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _write_masks(src: _Scores, n_prune: int, out: list[torch.Tensor]) -> None:
    """Select the threshold, then write every keep-mask into ``out`` (preallocated)."""
    threshold, n_tied = _threshold(src, n_prune)
    for i, (keep, a) in enumerate(zip(out, src.active)):
        keys = src.keys(i)
        torch.gt(keys, threshold, out=keep)  # bool, same shape
        tied = keys == threshold
        if a is not None:
            a = a.to(device=keep.device, dtype=torch.bool)
            keep &= a
            tied &= a
        tied_idx = tied.reshape(-1).nonzero().squeeze(1)  # [n_eq]
        del keys, tied
        keep.view(-1)[tied_idx[n_tied:]] = True  # prune only the first n_tied tied entries
        n_tied = max(0, n_tied - tied_idx.numel())


def _start_mask(scores: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    if active is None:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    return active.to(torch.bool).clone(memory_format=torch.contiguous_format)


def global_keep_masks(scores: Sequence[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Keep-masks that prune the ``n_prune`` smallest scores across all tensors together.

    Equivalent to concatenating every score and pruning the ``n_prune`` smallest (the semantics
    of ``torch.nn.utils.prune.global_unstructured`` on tie-free scores), returned per tensor;
    computed by :func:`keep_smallest` without concatenating (memory: the masks plus temporaries
    of one tensor).

    Args:
        scores: non-negative importance scores, one tensor per pruned parameter.
        n_prune: how many entries to prune in total, ``0 <= n_prune <= total``.

    Returns:
        One ``BoolTensor`` per score tensor, same shape, True where the entry is kept.
    """
    return keep_smallest(scores, n_prune)


# --- per-layer, per-row and N:M keep-masks (LLM pruning: magnitude, Wanda, SparseGPT) ---


def _keep_all_but_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest entries along the last dim of ``scores`` [..., d]."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores.float(), k, dim=-1, largest=False).indices  # [..., k]
        keep.scatter_(-1, idx, False)
    return keep


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * numel)`` smallest scores of one tensor (per-layer scope)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = scores.detach().reshape(-1)  # [numel]
    return _keep_all_but_smallest(flat, round(sparsity * flat.numel())).view(scores.shape)


def row_keep_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity * in)`` smallest scores of every output row of ``[out, in]``.

    This is the comparison group of Wanda (Sun et al. 2023): each output neuron loses the same
    number of inputs.
    """
    if scores.ndim != 2:
        raise ValueError(f"row masks need a 2-D [out, in] score, got shape {tuple(scores.shape)}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return _keep_all_but_smallest(scores.detach(), round(sparsity * scores.shape[1]))


def check_nm(scores: torch.Tensor, n: int, m: int) -> None:
    """Raise ValueError unless ``0 < n < m`` and ``scores`` is ``[out, in]`` with ``in % m == 0``."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if scores.ndim != 2 or scores.shape[1] % m:
        raise ValueError(
            f"N:M {n}:{m} needs a 2-D [out, in] score with in a multiple of {m}, "
            f"got shape {tuple(scores.shape)}"
        )


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every ``m`` consecutive inputs of each row, prune the ``n`` smallest.

    Args:
        scores: ``[out, in]`` importance; ``in`` must be a multiple of ``m``.
        n: entries pruned per group, ``0 < n < m``.
        m: group size along the input (last) dimension.
    """
    check_nm(scores, n, m)
    rows, cols = scores.shape
    groups = scores.detach().reshape(rows, cols // m, m)  # [out, in/m, m]
    return _keep_all_but_smallest(groups, n).view(rows, cols)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive inputs (per row) holding fewer than ``n`` zeros."""
    rows, cols = weight.shape
    zeros = (weight.detach().reshape(rows, cols // m, m) == 0).sum(-1)  # [out, in/m]
    return int((zeros < n).sum())
