"""Global selection without concatenation: masks.keep_smallest / global_keep_masks against topk."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunescope.pruning import masks


def reference_keep(scores: list[torch.Tensor], n_prune: int, magnitude: bool) -> list[torch.Tensor]:
    """The concatenate-and-topk definition (torch's global_unstructured), per tensor."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    if magnitude:
        flat = flat.abs()
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune:
        keep[torch.topk(flat, n_prune, largest=False).indices] = False
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def tie_free(shapes: list[tuple[int, ...]], seed: int, dtype: torch.dtype, signed: bool) -> list[torch.Tensor]:
    """Distinct values (distinct magnitudes too), spread over several binades, in random order."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in shapes)
    vals = torch.exp(torch.linspace(-12, 4, total, dtype=torch.float64))[torch.randperm(total, generator=g)]
    if signed:
        vals = vals * (torch.randint(0, 2, (total,), generator=g) * 2 - 1)
    vals = vals.to(dtype)
    out, offset = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(vals[offset : offset + n].view(s))
        offset += n
    return out


shapes_strategy = st.lists(
    st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
)


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_strategy,
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    signed=st.booleans(),
    magnitude=st.booleans(),
)
def test_same_masks_as_concatenated_topk_on_tie_free_scores(shapes, frac, seed, dtype, signed, magnitude) -> None:
    scores = tie_free(shapes, seed, dtype, signed)
    total = sum(s.numel() for s in scores)
    n_prune = round(frac * total)
    got = masks.keep_smallest(scores, n_prune, magnitude=magnitude)
    want = reference_keep(scores, n_prune, magnitude)
    for g, w, s in zip(got, want, scores):
        assert g.dtype == torch.bool and g.shape == s.shape
        assert torch.equal(g, w)


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_strategy,
    frac=st.floats(0, 1),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    use_active=st.booleans(),
)
def test_exact_count_with_ties_and_active_masks(shapes, frac, levels, seed, use_active) -> None:
    """Heavy ties (few distinct values): exactly n_prune pruned, never a kept entry below a pruned one."""
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, levels, s, generator=g).float() * 0.25 for s in shapes]
    active = [torch.rand(s, generator=g) > 0.3 for s in shapes] if use_active else None
    n_active = sum(int(a.sum()) for a in active) if active else sum(s.numel() for s in scores)
    n_prune = round(frac * n_active)
    got = masks.keep_smallest(scores, n_prune, active=active)
    acts = active or [torch.ones_like(s, dtype=torch.bool) for s in scores]
    pruned = torch.cat([(a & ~k).reshape(-1) for a, k in zip(acts, got)])
    kept = torch.cat([(a & k).reshape(-1) for a, k in zip(acts, got)])
    flat = torch.cat([s.reshape(-1) for s in scores])
    assert int(pruned.sum()) == n_prune
    assert not any(bool((k & ~a).any()) for a, k in zip(acts, got))  # inactive stays False
    if 0 < n_prune < n_active:
        assert flat[pruned].max() <= flat[kept].min()


def test_nan_is_largest_and_bf16_and_integer_scores() -> None:
    s = torch.tensor([[0.5, float("nan"), -3.0], [2.0, 0.1, -0.2]])
    keep = masks.keep_smallest([s], 5, magnitude=True)[0]
    assert keep.tolist() == [[False, True, False], [False, False, False]]
    keep = masks.keep_smallest([s], 1)[0]  # signed: -3 is the smallest
    assert keep.tolist() == [[True, True, False], [True, True, True]]
    b = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.bfloat16)
    assert masks.keep_smallest([b], 2)[0].tolist() == [True, False, True, False]
    i = torch.tensor([5, -7, 2, 9])
    assert masks.keep_smallest([i], 2, magnitude=True)[0].tolist() == [False, True, False, True]


def test_global_keep_masks_keeps_its_contract() -> None:
    """The pipeline's entry point: n_prune smallest across tensors, bool masks, validation."""
    scores = tie_free([(4, 6), (3, 5), (10,)], 1, torch.float32, signed=False)
    got = masks.global_keep_masks(scores, 20)
    assert sum(int((~m).sum()) for m in got) == 20
    for g, w in zip(got, reference_keep(scores, 20, magnitude=False)):
        assert torch.equal(g, w)
    assert all(bool(m.all()) for m in masks.global_keep_masks(scores, 0))
    assert not any(bool(m.any()) for m in masks.global_keep_masks(scores, 49))
    with pytest.raises(ValueError, match=r"\[0, 49\]"):
        masks.global_keep_masks(scores, 50)
    with pytest.raises(ValueError):
        masks.global_keep_masks(scores, -1)


def test_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    masks.keep_smallest([torch.randn(50, 40)], 1000, magnitude=True)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with masks.one_cpu_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
