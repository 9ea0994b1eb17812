import pytest
import torch

from prunescope.pruning import masks, scoring
from prunescope.pruning.job import keep_mask
from prunescope.pruning.patterns import SparsityPattern


def _slow_wanda(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_:,j||_2, entry by entry (x: [tokens, in])."""
    out = torch.empty_like(weight)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            norm = sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5
            out[i, j] = abs(float(weight[i, j])) * norm
    return out


def test_wanda_score_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen)
    x = torch.randn(11, 7, generator=gen)
    fast = scoring.wanda(w, x.pow(2).sum(0))
    assert torch.allclose(fast, _slow_wanda(w, x), rtol=1e-5, atol=1e-6)


def test_wanda_mask_hand_computed():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, 2.0, 1.0]])
    sq = torch.tensor([16.0, 1.0, 1.0, 0.25])  # column norms 4, 1, 1, 0.5
    scores = scoring.wanda(w, sq)
    assert scores.tolist() == [[4.0, 2.0, 3.0, 2.0], [16.0, 3.0, 2.0, 0.5]]
    keep = keep_mask(scores, SparsityPattern(0.5), "row")
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    # magnitude alone would keep a different set in row 0: |W| = 1, 2, 3, 4
    assert masks.row_keep_masks(scoring.magnitude(w), 0.5)[0].tolist() == [False, False, True, True]


def test_wanda_rejects_mismatched_stats():
    with pytest.raises(ValueError, match=r"expected \[4\]"):
        scoring.wanda(torch.ones(2, 4), torch.ones(3))


def _slow_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = round(sparsity * scores.shape[1])
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: row[j])[:k]:
            keep[i, j] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.75])
def test_row_mask_matches_sorting_each_row(sparsity):
    scores = torch.rand(6, 20, generator=torch.Generator().manual_seed(3))  # tie-free
    assert torch.equal(masks.row_keep_masks(scores, sparsity), _slow_row_mask(scores, sparsity))


def test_layer_mask_prunes_smallest_of_the_whole_tensor():
    scores = torch.tensor([[0.1, 5.0], [0.2, 0.3]])
    assert masks.layer_keep_mask(scores, 0.5).tolist() == [[False, True], [False, True]]
    assert masks.layer_keep_mask(scores, 0.75).tolist() == [[False, True], [False, False]]
