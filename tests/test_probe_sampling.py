"""The batch samplers: every table is an exact model sample; rqmc stratifies across the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from prunescope.probe.sampling import IidSampler, RqmcSampler, inverse_cdf, make_sampler

P1 = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])


def _second(first: torch.Tensor) -> torch.Tensor:
    """(B, 5) next-token distributions that depend on the first token (a history-dependent step)."""
    table = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2],
                          [0.0, 0.0, 0.0, 0.0, 1.0], [0.6, 0.0, 0.4, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    return table[first]


def test_inverse_cdf_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(5, -1)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9999999])
    assert inverse_cdf(probs, u).tolist() == [1, 1, 1, 3, 3]


@pytest.mark.parametrize("cls", [IidSampler, RqmcSampler])
def test_each_table_is_an_exact_two_step_sample(cls):
    """The joint law of (first, second) token of one table is P1 x P2|first, for every sampler."""
    gen = torch.Generator().manual_seed(0)
    b, runs = 6, 3000
    pairs = np.zeros((5, 5))
    for _ in range(runs):
        sampler = cls(b, gen)
        first = sampler.draw(P1.expand(b, -1), torch.ones(b, dtype=torch.bool))
        second = sampler.draw(_second(first), torch.ones(b, dtype=torch.bool))
        pairs[int(first[2]), int(second[2])] += 1  # table 2: any fixed table must be an exact sample
    expected = (P1[:, None] * _second(torch.arange(5))).numpy() * runs
    keep = expected > 0
    assert pairs[~keep].sum() == 0
    chi2 = (((pairs - expected) ** 2)[keep] / expected[keep]).sum()
    assert sps.chi2.sf(chi2, keep.sum() - 1) > 1e-3, (pairs, expected)


def test_rqmc_first_step_is_systematic():
    """All tables alike: every token is drawn by p*B tables up to rounding (iid would scatter)."""
    gen = torch.Generator().manual_seed(1)
    b = 200
    for _ in range(20):
        tokens = RqmcSampler(b, gen).draw(P1.expand(b, -1), torch.ones(b, dtype=torch.bool))
        counts = torch.bincount(tokens, minlength=5).double()
        assert torch.all((counts - P1.double() * b).abs() <= 1.0), counts


def test_rqmc_stratifies_tables_that_share_a_history():
    """At step 2 the tables that drew the same first token are spread over the second distribution."""
    gen = torch.Generator().manual_seed(2)
    b = 400
    sampler = RqmcSampler(b, gen)
    first = sampler.draw(P1.expand(b, -1), torch.ones(b, dtype=torch.bool))
    second = sampler.draw(_second(first), torch.ones(b, dtype=torch.bool))
    group = first == 0  # P2 | first=0 is (0.1, 0.9)
    share = float((second[group] == 0).double().mean())
    assert abs(share - 0.1) <= 2.0 / int(group.sum())


def test_rqmc_counts_after_histories_diverge_are_not_overdispersed():
    """Regression: a batch-wide lattice sorted by history kept each table's offset once histories
    were distinct, so the tables that drew token 0 at step 1 drew step 2 from one arc of [0, 1)
    and the step-2 count scattered far more than binomially. Within-group draws must not."""
    gen = torch.Generator().manual_seed(3)
    b, runs = 64, 300
    ones = torch.ones(b, dtype=torch.bool)
    counts = []
    for _ in range(runs):
        sampler = RqmcSampler(b, gen)
        sampler.draw(torch.full((b, b), 1.0 / b), ones)  # step 0: every table a distinct token
        first = sampler.draw(torch.tensor([[0.5, 0.5]]).expand(b, -1), ones)  # step 1: fair coin
        second = sampler.draw(torch.tensor([[0.9, 0.1], [0.1, 0.9]])[first], ones)  # step 2 copies it
        counts.append(int((second == 0).sum()))
    counts_arr = np.array(counts, dtype=float)
    assert abs(counts_arr.mean() - 32.0) < 4 * 4.0 / np.sqrt(runs)  # unbiased: E = 64 * 0.5
    # binomial variance 64 * 0.5 * 0.5 = 16; the old batch-wide lattice gave 29 here
    assert counts_arr.var(ddof=1) < 16.0 * 1.35, counts_arr.var(ddof=1)


def test_make_sampler_rejects_unknown_names():
    with pytest.raises(ValueError, match="iid"):
        make_sampler("sobol", 2, torch.Generator())
