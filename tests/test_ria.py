"""RIA score and RIA's N:M channel permutation (prunescope.pruning.ria)."""

from __future__ import annotations

import itertools

import pytest
import torch

from prunescope.pruning import masks, ria


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _slow_ria(weight: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
    """(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_:,j||_2 ** a, entry by entry."""
    out_f, in_f = weight.shape
    w = weight.tolist()
    res = torch.empty(out_f, in_f, dtype=torch.float64)
    for i in range(out_f):
        for j in range(in_f):
            row = sum(abs(w[i][k]) for k in range(in_f))
            col = sum(abs(w[k][j]) for k in range(out_f))
            norm = sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5
            res[i, j] = (abs(w[i][j]) / row + abs(w[i][j]) / col) * norm**a
    return res


def _nm_kept(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """Kept score of the plain N:M mask on scores[:, perm]."""
    permuted = scores[:, perm]
    return ria.kept_score(permuted, masks.nm_keep_mask(permuted, n, m))


# --- score ---


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0, 2.0])
def test_score_matches_direct_formula(a):
    w = torch.randn(5, 7, generator=_gen(0))
    x = torch.randn(11, 7, generator=_gen(1))
    fast = ria.score(w, x.pow(2).sum(0), a=a)
    assert fast.dtype == torch.float32 and fast.shape == (5, 7)
    assert torch.allclose(fast.double(), _slow_ria(w, x, a), rtol=1e-5, atol=1e-7)


def test_score_scale_invariance():
    w = torch.randn(6, 10, generator=_gen(2))
    sq = torch.rand(10, generator=_gen(3)) * 5
    base = ria.score(w, sq, a=0.5)
    # RI is invariant to scaling W by a positive constant
    assert torch.allclose(ria.score(3.7 * w, sq, a=0.5), base, rtol=1e-5)
    # scaling the statistics by c scales every score by c ** (a / 2): same ranking, same masks
    for a in (0.5, 1.0):
        scaled = ria.score(w, 9.0 * sq, a=a)
        assert torch.allclose(scaled, 9.0 ** (a / 2) * ria.score(w, sq, a=a), rtol=1e-5)
        assert torch.equal(
            masks.row_keep_masks(scaled, 0.5), masks.row_keep_masks(ria.score(w, sq, a=a), 0.5)
        )


def test_score_zero_rows_and_columns_give_zero_not_nan():
    w = torch.randn(4, 6, generator=_gen(4))
    w[1] = 0.0  # an all-zero output row
    w[:, 3] = 0.0  # an all-zero input column
    sq = torch.rand(6, generator=_gen(5)) + 0.1
    sq[5] = 0.0  # an input never active
    s = ria.score(w, sq, a=0.5)
    assert torch.isfinite(s).all()
    assert (s[1] == 0).all() and (s[:, 3] == 0).all() and (s[:, 5] == 0).all()
    assert (s[[0, 2, 3]][:, [0, 1, 2, 4]] > 0).all()
    # a = 0 ignores the activations: 0 ** 0 = 1, pure relative importance
    assert (ria.score(w, sq, a=0.0)[[0, 2, 3], 5] > 0).all()
    assert torch.equal(ria.score(torch.zeros(3, 4), torch.zeros(4)), torch.zeros(3, 4))


def test_score_rejects_bad_shapes_and_exponent():
    with pytest.raises(ValueError, match=r"\(6,\).*\(5, 7\).*expected \[7\]"):
        ria.score(torch.ones(5, 7), torch.ones(6))
    with pytest.raises(ValueError, match=r"2-D.*\(7,\)"):
        ria.score(torch.ones(7), torch.ones(7))
    with pytest.raises(ValueError, match="a must be >= 0"):
        ria.score(torch.ones(2, 3), torch.ones(3), a=-0.5)


# --- channel permutation ---


def _is_permutation(perm: torch.Tensor, size: int) -> bool:
    return perm.dtype == torch.int64 and torch.equal(torch.sort(perm).values, torch.arange(size))


def test_reallocation_puts_one_channel_of_each_band_in_every_group():
    col = torch.rand(32, generator=_gen(6))
    perm = ria._reallocate(col, 4)
    assert _is_permutation(perm, 32)
    rank = torch.empty(32, dtype=torch.long)
    rank[torch.argsort(col)] = torch.arange(32)
    band = rank[perm].reshape(8, 4) // 8  # [G, m]: band of each channel, by position
    assert torch.equal(band, torch.arange(4).expand(8, 4))
    # a snake: group g takes the g-th of even bands and the g-th from the top of odd bands
    within = rank[perm].reshape(8, 4) % 8  # [G, m]
    g = torch.arange(8)
    assert torch.equal(within[:, 0::2], g[:, None].expand(8, 2))
    assert torch.equal(within[:, 1::2], (7 - g)[:, None].expand(8, 2))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_assignment_gain_matches_direct_topk(n, m):
    rest = torch.rand(5, 6, m - 1, generator=_gen(7), dtype=torch.float64)  # [out, G, m-1]
    cand = torch.rand(5, 6, generator=_gen(8), dtype=torch.float64)  # [out, G]
    gain = ria._assignment_gain(rest, cand, n, m)
    for g in range(6):
        for c in range(6):
            full = torch.cat([rest[:, g], cand[:, c : c + 1]], dim=1)  # [out, m]
            direct = full.topk(m - n, dim=1).values.sum()
            assert abs(float(gain[g, c]) - float(direct)) < 1e-9


@pytest.mark.parametrize("kind", ["rand", "ria"])
def test_permutation_never_worse_and_usually_better(kind):
    strictly_better = 0
    for seed in range(20):
        if kind == "rand":
            scores = torch.rand(16, 64, generator=_gen(seed))
        else:
            w = torch.randn(16, 64, generator=_gen(seed))
            scores = ria.score(w, 10 * torch.rand(64, generator=_gen(seed + 100)))
        perm = ria.permute_for_nm(scores, 2, 4)
        assert _is_permutation(perm, 64)
        identity = _nm_kept(scores, torch.arange(64), 2, 4)
        permuted = _nm_kept(scores, perm, 2, 4)
        assert permuted >= identity
        strictly_better += permuted > identity * (1 + 1e-6)
    assert strictly_better >= 16  # measured: 20 of 20, each by 3.6% or more


def test_assignment_steps_never_lower_the_kept_score():
    scores = torch.rand(8, 48, generator=_gen(9))
    perm = ria._reallocate(scores.double().sum(0), 4)
    kept = _nm_kept(scores, perm, 2, 4)
    for k in range(4):
        perm = ria._lsa_step(scores, perm, 2, 4, k)
        assert _is_permutation(perm, 48)
        new = _nm_kept(scores, perm, 2, 4)
        assert new >= kept - 1e-9
        kept = new


def test_permutation_falls_back_to_identity_when_nothing_gains():
    scores = torch.ones(4, 16)  # every grouping keeps the same total
    assert torch.equal(ria.permute_for_nm(scores, 2, 4), torch.arange(16))


def test_blocks_and_rounds():
    scores = torch.rand(8, 64, generator=_gen(10))
    identity = _nm_kept(scores, torch.arange(64), 2, 4)
    one = _nm_kept(scores, ria.permute_for_nm(scores, 2, 4, rounds=1), 2, 4)
    two = _nm_kept(scores, ria.permute_for_nm(scores, 2, 4, rounds=2), 2, 4)
    blocked = ria.permute_for_nm(scores, 2, 4, blocks=4)
    assert _is_permutation(blocked, 64)
    assert two >= one - 1e-9 and _nm_kept(scores, blocked, 2, 4) >= identity
    with pytest.raises(ValueError, match="blocks"):
        ria.permute_for_nm(scores, 2, 4, blocks=17)
    with pytest.raises(ValueError, match="multiple of 4"):
        ria.permute_for_nm(torch.rand(2, 10), 2, 4)


def _best_split_of_eight(scores: torch.Tensor) -> float:
    """Best 2:4 kept score over every split of 8 channels into 2 groups of 4 (35 splits)."""
    best = float("-inf")
    for first in itertools.combinations(range(1, 8), 3):
        group = [0, *first]
        perm = torch.tensor(group + [c for c in range(8) if c not in group])
        best = max(best, _nm_kept(scores, perm, 2, 4))
    return best


def test_permutation_against_brute_force_on_tiny_case():
    optimal = 0
    for seed in range(50):
        scores = torch.rand(3, 8, generator=_gen(seed))
        got = _nm_kept(scores, ria.permute_for_nm(scores, 2, 4), 2, 4)
        best = _best_split_of_eight(scores)
        assert _nm_kept(scores, torch.arange(8), 2, 4) <= got <= best + 1e-9
        assert got >= 0.97 * best  # measured: within 2.6% of the optimum
        optimal += got >= best - 1e-9
    assert optimal >= 30  # measured: 33 of 50 reach the optimum


# --- keep-mask in the original order ---


def test_nm_keep_mask_permuted_is_nm_in_permuted_order():
    scores = torch.rand(16, 64, generator=_gen(11))
    perm = ria.permute_for_nm(scores, 2, 4)
    keep = ria.nm_keep_mask_permuted(scores, 2, 4, perm=perm)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    per_group = keep[:, perm].reshape(16, 16, 4).sum(-1)  # [out, G] kept per permuted group
    assert (per_group == 2).all()
    # the same total as selected in permuted space, more than direct N:M
    assert ria.kept_score(scores, keep) == pytest.approx(_nm_kept(scores, perm, 2, 4), rel=1e-12)
    assert ria.kept_score(scores, keep) > _nm_kept(scores, torch.arange(64), 2, 4)
    # not N:M in the original order: hardware kernels would need the permutation applied
    assert masks.nm_violations(keep.float(), 2, 4) > 0
    # without perm it computes the same permutation
    assert torch.equal(ria.nm_keep_mask_permuted(scores, 2, 4), keep)


def test_nm_keep_mask_permuted_rejects_bad_perm():
    scores = torch.rand(2, 8, generator=_gen(12))
    with pytest.raises(ValueError, match="permutation of range"):
        ria.nm_keep_mask_permuted(scores, 2, 4, perm=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))


def test_kept_score_rejects_mismatched_mask():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        ria.kept_score(torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool))
