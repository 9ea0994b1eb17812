"""The pure maths of structured pruning, each against a direct, slow computation on raw inputs."""

import pytest
import torch

from prunescope.errors import PrunescopeError
from prunescope.families import MLP, family_for
from prunescope.pruning import structured
from prunescope.pruning.shrink import _magnitudes
from prunescope.testing import tiny_family_model


@pytest.fixture()
def raw():
    """A writer W [out=6, in=10] and its inputs X [tokens=200, in=10] with non-zero means."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2, 10) + torch.linspace(-1, 1, 10)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    return w, x, x.pow(2).sum(0), x.sum(0), x.T @ x


def test_flap_and_wanda_sp_column_scores_match_their_formulas(raw):
    w, x, sq, lin, _ = raw
    flap = structured.column_scores("flap", w, sq, lin, x.shape[0])
    direct = x.var(0, unbiased=False) * w.pow(2).sum(0)
    torch.testing.assert_close(flap, direct)
    wanda = structured.column_scores("wanda-sp", w, sq, lin, x.shape[0])
    torch.testing.assert_close(wanda, w.abs().sum(0) * x.norm(dim=0))


def test_lstsq_is_the_ridge_least_squares_solution(raw):
    w, x, _, _, gram = raw
    kept = torch.tensor([0, 2, 3, 7, 9])
    damp = 0.05
    new = structured.lstsq_compensation(w, gram, kept, damp)  # [6, 5]
    lam = damp * gram.diagonal()[kept]  # [k]: each column's own ridge
    # direct: minimise ||X_K B - X W^T||^2 + sum_j lam_j ||B_j - W_K^T_j||^2 as an augmented
    # ordinary least-squares problem
    root = torch.diag(lam.sqrt())
    a = torch.cat([x[:, kept], root])
    b = torch.cat([x @ w.T, root @ w[:, kept].T])
    direct = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(new, direct)


def test_lstsq_is_never_worse_than_no_compensation_even_with_massive_channels():
    """One channel 1000x louder than the rest: a ridge on the mean energy would shrink the others."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    x[:, 0] *= 1000
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    gram, lin = x.T @ x, x.sum(0)
    kept = torch.tensor([0, 1, 2, 3, 5, 8, 9, 11])
    none = structured.output_error(w, gram, lin, 300, kept)
    for damp in (1e-4, 1e-2, 1.0, 100.0):
        refit = structured.lstsq_compensation(w, gram, kept, damp)
        assert structured.output_error(w, gram, lin, 300, kept, new_kept=refit) <= none


@pytest.mark.parametrize("variant", ["none", "bias", "lstsq"])
def test_output_error_matches_the_outputs(raw, variant):
    w, x, _, lin, gram = raw
    kept = torch.tensor([1, 4, 5, 8])
    removed = structured.removed_from(kept, 10)
    new_kept, bias = None, None
    if variant == "bias":
        bias = structured.bias_compensation(w, lin / x.shape[0], removed)
    if variant == "lstsq":
        new_kept = structured.lstsq_compensation(w, gram, kept)
    err = structured.output_error(w, gram, lin, x.shape[0], kept, new_kept, bias)
    pruned = x[:, kept] @ (w[:, kept] if new_kept is None else new_kept).T + (0 if bias is None else bias)
    dense = x @ w.T
    assert err == pytest.approx(float((pruned - dense).pow(2).sum() / dense.pow(2).sum()), rel=1e-9)


def test_bias_compensation_removes_the_mean_error_and_lstsq_beats_bias(raw):
    w, x, _, lin, gram = raw
    kept = torch.tensor([0, 1, 2, 3, 4])
    removed = structured.removed_from(kept, 10)
    bias = structured.bias_compensation(w, lin / x.shape[0], removed)
    residual = x[:, kept] @ w[:, kept].T + bias - x @ w.T  # [tokens, out]
    torch.testing.assert_close(residual.mean(0), torch.zeros(6, dtype=x.dtype))
    errors = {
        v: structured.output_error(w, gram, lin, x.shape[0], kept, *args)
        for v, args in {"none": (), "bias": (None, bias), "lstsq": (structured.lstsq_compensation(w, gram, kept, 1e-6),)}.items()
    }
    assert errors["lstsq"] < errors["bias"] < errors["none"]


def test_top_units_keeps_the_best_ascending_and_the_lower_index_on_ties():
    scores = torch.tensor([3.0, 1.0, 3.0, 5.0, 1.0])
    assert structured.top_units(scores, 3).tolist() == [0, 2, 3]
    assert structured.top_units(scores, 4).tolist() == [0, 1, 2, 3]


def test_select_heads_stays_a_valid_gqa_layer():
    # 3 groups of 4 query heads; group sums 6, 22, 38 -> group 0 goes first
    q = torch.arange(12, dtype=torch.float64)
    groups = structured.group_scores(q, 3)
    assert groups.tolist() == [6.0, 22.0, 38.0]
    kept_q, kept_kv = structured.select_heads(q, groups, drop_groups=1, drop_per_group=1)
    assert kept_kv.tolist() == [1, 2]
    assert kept_q.tolist() == [5, 6, 7, 9, 10, 11]  # the weakest head of each kept group goes
    assert len(kept_q) % len(kept_kv) == 0


def test_unit_columns_and_per_unit_are_inverse_views():
    assert structured.unit_columns(torch.tensor([0, 2]), 3, offset=10).tolist() == [10, 11, 12, 16, 17, 18]
    feats = torch.arange(12.0)
    assert structured.per_unit(feats, 0, 4, 3).tolist() == [3.0, 12.0, 21.0, 30.0]


@pytest.mark.parametrize(
    "count, fraction, multiple, kept",
    [(1536, 0.25, 64, 1152), (1536, 1 / 3, 64, 1024), (1536, 0.3, 64, 1088), (64, 0.5, 8, 32),
     (40, 0.5, 8, 24), (56, 0.5, 8, 32)],  # halves round up: 20 -> 24, 28 -> 32
)
def test_kept_width_rounds_to_the_nearest_multiple(count, fraction, multiple, kept):
    assert structured.kept_width(count, fraction, multiple, "MLP channels") == kept


@pytest.mark.parametrize(
    "count, fraction, multiple, message",
    [(64, 0.01, 8, "nothing would be removed"), (64, 0.99, 8, "every unit would be removed"),
     (64, 0.5, 128, "--multiple-of 128 must be between 1 and the MLP channels width (64)"), (64, 1.0, 8, "in (0, 1)")],
)
def test_kept_width_refuses_all_or_nothing(count, fraction, multiple, message):
    with pytest.raises(PrunescopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        structured.kept_width(count, fraction, multiple, "MLP channels")


def test_block_influence_is_one_minus_cosine():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    total, n = structured.block_influence_sum(a, b)
    direct = sum(1 - float(a[i, t] @ b[i, t] / (a[i, t].norm() * b[i, t].norm())) for i in range(2) for t in range(5))
    assert n == 10 and total == pytest.approx(direct, rel=1e-5)
    assert structured.block_influence_sum(a, a)[0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_mlp_magnitude_is_the_norm_of_every_weight_a_channel_owns(family):
    model = tiny_family_model(family, mlp_bias=True) if family == "llama" else tiny_family_model(family)
    layer = model.get_submodule({"gpt2": "transformer.h"}.get(family, "model.layers"))[0]
    layout = family_for(model).layouts(model.config)[MLP]
    got = _magnitudes(layer, layout)
    mlp = layer.mlp
    if family == "llama":  # with mlp_bias: gate and up own their bias entries, down's bias is shared
        parts = [mlp.gate_proj.weight.pow(2).sum(1), mlp.up_proj.weight.pow(2).sum(1), mlp.down_proj.weight.pow(2).sum(0),
                 mlp.gate_proj.bias.pow(2), mlp.up_proj.bias.pow(2)]
    elif family == "phi3":
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        parts = [gate.pow(2).sum(1), up.pow(2).sum(1), mlp.down_proj.weight.pow(2).sum(0)]
    else:  # Conv1D: weight [in, out]; c_fc's bias belongs to its output channels
        parts = [mlp.c_fc.weight.pow(2).sum(0), mlp.c_fc.bias.pow(2), mlp.c_proj.weight.pow(2).sum(1)]
    torch.testing.assert_close(got, sum(parts).double(), rtol=1e-5, atol=1e-7)
