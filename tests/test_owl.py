"""OWL (outlier-weighted layerwise sparsity): the ratio and the allocation against direct
formulas, and the prune job giving each decoder layer its allocated sparsity."""

import json

import pytest
import torch

from prunescope import cli
from prunescope.pruning import owl
from prunescope.pruning.job import PruneConfig, run_prune


def test_outlier_ratio_matches_pooled_count():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(4, 6, generator=gen) ** 6, torch.rand(3, 5, generator=gen) ** 6]
    pooled = torch.cat([s.reshape(-1) for s in scores]).double()
    want = float((pooled > 3.0 * pooled.mean()).double().mean())
    assert owl.outlier_ratio(lambda: iter(scores), m=3.0) == pytest.approx(want)
    assert 0 < want < 1  # the case is not trivial


def _paper_allocation(ratios, sparsity, lam):
    """The paper's steps on keep ratios: rescale D to [0, 2 lam], centre on the target density."""
    d = torch.tensor(ratios, dtype=torch.float64)
    keep = (d - d.min()) * (1.0 / (d.max() - d.min()) * lam * 2)
    keep = keep - keep.mean() + (1 - sparsity)
    return (1 - keep).tolist()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_allocation_matches_the_papers_steps(sparsity):
    ratios = [0.010, 0.031, 0.022, 0.004, 0.018]
    got = owl.allocate(ratios, sparsity, 0.08)
    assert got == pytest.approx(_paper_allocation(ratios, sparsity, 0.08))
    assert sum(got) / len(got) == pytest.approx(sparsity)
    assert max(got) - min(got) == pytest.approx(0.16)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [got[i] for i in order] == sorted(got, reverse=True)  # more outliers, pruned less


def test_equal_ratios_give_uniform_sparsity_and_bad_lambda_is_refused():
    assert owl.allocate([0.02, 0.02, 0.02], 0.6) == [0.6, 0.6, 0.6]
    with pytest.raises(ValueError, match="lambda must be in"):
        owl.allocate([0.1, 0.2], 0.05, 0.08)


def _config(folder, text, **kw):
    base = dict(model=str(folder), calib_text=text, eval_text=text, calib_samples=4, calib_seqlen=32,
                eval_tokens=256, eval_seqlen=32, device="cpu")
    return PruneConfig(**{**base, **kw})


@pytest.mark.parametrize("method, scope", [("wanda", None), ("sparsegpt", None), ("magnitude", "row")])
def test_each_decoder_layer_gets_its_allocated_sparsity(tiny_model_dir, text_file, method, scope):
    result, model = run_prune(_config(tiny_model_dir, text_file, method=method, scope=scope,
                                      sparsity=0.6, allocation="owl"))
    assert result.allocation == "owl" and len(result.layer_targets) == 2
    targets = {t.index: t.sparsity for t in result.layer_targets}
    assert sum(targets.values()) / 2 == pytest.approx(0.6)
    assert max(targets.values()) - min(targets.values()) == pytest.approx(0.16)  # two layers: +- lambda
    for index, target in targets.items():
        layers = [ls for ls in result.layers if ls.name.startswith(f"model.layers.{index}.")]
        zeros = sum(ls.sparsity * ls.shape[0] * ls.shape[1] for ls in layers)
        total = sum(ls.shape[0] * ls.shape[1] for ls in layers)
        assert zeros / total == pytest.approx(target, abs=0.02)  # rounded per row of 32 inputs


def test_owl_changes_nothing_when_all_layers_have_the_same_ratio(tiny_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(owl, "outlier_ratio", lambda scores, m: 0.01)
    uniform, _ = run_prune(_config(tiny_model_dir, text_file, method="wanda"))
    allocated, _ = run_prune(_config(tiny_model_dir, text_file, method="wanda", allocation="owl"))
    assert allocated.layers == uniform.layers and allocated.pruned_ppl == pytest.approx(uniform.pruned_ppl)


def test_offloaded_owl_equals_in_memory(tiny_model_dir, text_file, tmp_path):
    memory, _ = run_prune(_config(tiny_model_dir, text_file, method="wanda", sparsity=0.6, allocation="owl"))
    off, _ = run_prune(_config(tiny_model_dir, text_file, method="wanda", sparsity=0.6, allocation="owl",
                               offload=True, save_dir=tmp_path / "m"))
    assert off.layer_targets == memory.layer_targets and off.layers == memory.layers
    assert off.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)


def test_cli_reports_the_allocation(quick_prune, tmp_path):
    out = tmp_path / "run"
    rc = quick_prune(out, "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"] == "owl" and [t["index"] for t in report["layer_targets"]] == [0, 1]
    assert "## Allocation (OWL)" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--allocation", "bogus"], "unknown allocation 'bogus'; choose one of uniform, owl"),
    (["--allocation", "owl", "--method", "wanda", "--pattern", "2:4"], "an N:M pattern (2:4) fixes it"),
    (["--allocation", "owl", "--method", "magnitude"], "global magnitude chooses its own allocation"),
    (["--allocation", "owl", "--method", "wanda", "--sparsity", "0.05"], "--owl-lambda 0.08 is out of range"),
    (["--allocation", "owl", "--method", "wanda", "--owl-m", "0"], "--owl-m must be a positive"),
])
def test_bad_allocation_options_are_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    assert cli.main(["prune", str(tiny_model_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
