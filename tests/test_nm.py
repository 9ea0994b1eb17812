import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunescope.pruning import job as pipeline, masks, sparsegpt
from prunescope.pruning.patterns import SparsityPattern


def test_nm_mask_hand_computed():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 9.0]])
    keep = masks.nm_keep_mask(scores, 2, 4)
    assert keep.tolist() == [[True, False, True, False, True, False, False, True]]
    keep_18 = masks.nm_keep_mask(scores, 1, 8)
    assert keep_18.tolist() == [[True, True, True, True, True, False, True, True]]


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        masks.nm_keep_mask(torch.rand(3, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        masks.nm_keep_mask(torch.rand(3, 8), 4, 4)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (5, 8)]),
    seed=st.integers(0, 10_000),
)
def test_nm_mask_exactly_n_pruned_per_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = masks.nm_keep_mask(scores, n, m)
    pruned_per_group = (~keep).reshape(rows, groups, m).sum(-1)
    assert (pruned_per_group == n).all()
    # the pruned ones are the smallest of their group
    g = scores.reshape(rows, groups, m)
    kmask = keep.reshape(rows, groups, m)
    max_pruned = torch.where(~kmask, g, torch.full_like(g, -1)).amax(-1)
    min_kept = torch.where(kmask, g, torch.full_like(g, 2)).amin(-1)
    assert (max_pruned <= min_kept).all()


def test_nm_violations_counts_groups():
    w = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    assert masks.nm_violations(w, 2, 4) == 1
    assert masks.nm_violations(w, 1, 4) == 0


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_is_valid(n, m):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 32, generator=gen)
    x = torch.randn(200, 32, generator=gen)
    new_w, keep = sparsegpt.prune(w, 2 * x.T @ x / 200, SparsityPattern.nm(n, m), block_size=12)
    assert masks.nm_violations(new_w, n, m) == 0
    assert (new_w[~keep] == 0).all()
    assert ((~keep).reshape(12, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_method_gives_valid_2_4_on_tiny_llama(method, tiny_model):
    layers = pipeline.select_linear_layers(tiny_model)
    blocks = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    pipeline.prune_model(tiny_model, layers, method, SparsityPattern.nm(2, 4), "group", blocks, 2)
    for name, module in layers.items():
        assert masks.nm_violations(module.weight, 2, 4) == 0, name
    zeros, total = pipeline.actual_sparsity(layers)
    assert zeros / total == pytest.approx(0.5, abs=1e-6)
