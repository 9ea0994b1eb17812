"""``--permute``: RIA's channel permutation of the MLP units before N:M pruning, folded into the
weights. The permuted layer computes what it did; the pruned down_proj is N:M in storage order
and keeps at least the score the unpermuted N:M mask keeps; the saved model reloads as a plain
N:M model; bad combinations are one line."""

import json

import pytest
import torch

from prunescope import cli, families, models
from prunescope.pruning import apply, calib, masks, ria, scoring
from prunescope.pruning.job import PruneConfig, permute_mlp_units, prune_model, run_prune, select_linear_layers
from prunescope.pruning.patterns import SparsityPattern
from prunescope.testing import FAMILIES, tiny_family_model, tiny_llama


def _blocks() -> torch.Tensor:
    return torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_units_compute_the_same(family):
    """Every family's MLP (separate or fused gate/up, Conv1D, biases) reordered: same logits."""
    model = tiny_family_model(family)
    layout = families.family_for(model).layouts(model.config)[families.MLP]
    ids = _blocks()[:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        layer = models.adapter_for(model).layers(model)[1]
        perm = torch.randperm(layout.count, generator=torch.Generator().manual_seed(1))
        apply.permute_units(layer, layout, perm)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(perm, torch.arange(layout.count))


def test_permute_units_rejects_a_non_permutation():
    model = tiny_llama()
    layout = families.family_for(model).layouts(model.config)[families.MLP]
    with pytest.raises(ValueError, match="permutation of range"):
        apply.permute_units(models.adapter_for(model).layers(model)[0], layout,
                            torch.zeros(layout.count, dtype=torch.long))


def _layer0(model):
    adapter = models.adapter_for(model)
    inputs = calib.capture_first_layer_inputs(model, adapter, _blocks())
    layer = adapter.layers(model)[0]
    targets = {n: m for n, m in select_linear_layers(model).items() if n.startswith("model.layers.0.")}
    return layer, targets, inputs


@pytest.mark.parametrize("method", ["wanda", "ria"])
def test_permuted_down_proj_is_nm_in_storage_and_keeps_more(method):
    """Layer 0 (whose inputs pruning cannot change): the job's down_proj is 2:4 as stored, and
    the score it keeps (on the dense layer's own inputs, permuted) is at least what the
    unpermuted 2:4 mask keeps."""
    model = tiny_llama(intermediate_size=128)
    layer, targets, inputs = _layer0(model)
    name = "model.layers.0.mlp.down_proj"
    stats = calib.collect_stats(layer, {name: targets[name]}, inputs, hessian=False)[name]
    score = (scoring.wanda if method == "wanda" else ria.score)(targets[name].weight.detach().clone(), stats.sq_sum)
    plain = float(score[masks.nm_keep_mask(score, 2, 4)].sum())
    perm = ria.permute_for_nm(score, 2, 4)
    permuted = ria.kept_nm_score(score, perm, 2, 4)
    assert permuted > plain * 1.001  # the tiny layer has something to gain

    prune_model(model, select_linear_layers(model), method, SparsityPattern.nm(2, 4), "group", _blocks(), permute=True)
    kept = targets[name].weight != 0
    assert masks.nm_violations(targets[name].weight, 2, 4) == 0
    # the job's kept score: its weights are the dense ones, permuted; the score of what it kept
    assert float(score[:, perm][kept].sum()) == pytest.approx(permuted, rel=1e-6)
    assert masks.nm_violations(targets["model.layers.0.mlp.gate_proj"].weight, 2, 4) == 0  # rows moved, still 2:4


def test_permute_returns_the_gain_and_skips_a_layer_without_the_writer():
    model = tiny_llama(intermediate_size=128)
    layer, targets, inputs = _layer0(model)
    gain = permute_mlp_units(model, layer, targets, inputs, "sparsegpt", SparsityPattern.nm(2, 4))
    assert gain is not None and gain >= 0
    no_writer = {n: m for n, m in targets.items() if not n.endswith("down_proj")}
    assert permute_mlp_units(model, layer, no_writer, inputs, "wanda", SparsityPattern.nm(2, 4)) is None


def test_cli_permute_saves_a_plain_nm_model(quick_prune, tmp_path):
    from prunescope import formats

    out = tmp_path / "run"
    rc = quick_prune(out, "--method", "sparsegpt", "--pattern", "2:4", "--permute", "--save")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["permute"] is True and report["sparsity_actual"] == pytest.approx(0.5)
    assert "MLP units permuted" in (out / "report.md").read_text()
    state = formats.load_sparse(out / "model")
    linears = [k for k in state if ".layers." in k and k.endswith("_proj.weight")]
    assert len(linears) == 14 and all(masks.nm_violations(state[k], 2, 4) == 0 for k in linears)


def test_offloaded_permute_equals_in_memory(tiny_model_dir, text_file, tmp_path):
    base = dict(model=str(tiny_model_dir), calib_text=text_file, eval_text=text_file, calib_samples=4,
                calib_seqlen=32, eval_tokens=256, eval_seqlen=32, device="cpu", method="wanda", pattern="2:4",
                permute=True)
    memory, _ = run_prune(PruneConfig(**base))
    off, _ = run_prune(PruneConfig(**base, offload=True, save_dir=tmp_path / "m"))
    assert off.layers == memory.layers and off.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--permute"], "with an unstructured sparsity every order keeps the same"),
    (["--permute", "--pattern", "2:4", "--method", "magnitude"], "--permute works with one calibrated method"),
    (["--permute", "--pattern", "2:4", "--method", "wanda", "--refine", "dsnot"], "cannot be combined with --refine"),
])
def test_bad_permute_options_are_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    assert cli.main(["prune", str(tiny_model_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_permute_on_cuda():
    """On a CUDA model (scipy's assignment runs on CPU copies of the scores): every Linear ends
    2:4 as stored, and permuting the dense model changes none of its logits."""
    model = tiny_llama(intermediate_size=128).cuda()
    layout = families.family_for(model).layouts(model.config)[families.MLP]
    ids = _blocks()[:2].cuda()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply.permute_units(models.adapter_for(model).layers(model)[0], layout,
                            torch.randperm(layout.count, device="cuda"))
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
    prune_model(model, select_linear_layers(model), "wanda", SparsityPattern.nm(2, 4), "group", _blocks(),
                permute=True)
    assert all(masks.nm_violations(m.weight, 2, 4) == 0 for m in select_linear_layers(model).values())


def test_permute_on_an_unknown_family_is_one_line_before_any_work(monkeypatch):
    from prunescope.errors import PrunescopeError

    model = tiny_llama()
    monkeypatch.setattr(model.config, "model_type", "mystery")
    dense = {n: m.weight.detach().clone() for n, m in select_linear_layers(model).items()}
    with pytest.raises(PrunescopeError, match="--permute does not support model type 'mystery'"):
        prune_model(model, select_linear_layers(model), "wanda", SparsityPattern.nm(2, 4), "group", _blocks(),
                    permute=True)
    assert all(torch.equal(m.weight, dense[n]) for n, m in select_linear_layers(model).items())


def test_the_summary_suggests_permute_for_nm_wanda_and_ria_only():
    from types import SimpleNamespace

    from prunescope.commands.prune import _next_steps

    def hint(**kw):
        base = dict(allocation="uniform", pattern="2:4", refine="none", method="wanda", permute=False)
        return "--permute" in _next_steps(SimpleNamespace(**{**base, **kw}))

    assert hint() and hint(method="ria")
    assert not hint(permute=True) and not hint(pattern="unstructured") and not hint(method="sparsegpt")
