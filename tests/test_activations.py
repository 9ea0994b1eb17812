"""Activation-sparsity profiler, threshold sparsity, swap, study and CLI, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from prunescope import cli
from prunescope.activations import threshold
from prunescope.activations.job import ActivationsConfig, run_activations
from prunescope.activations.profiler import profile
from prunescope.activations.sites import find_activations
from prunescope.activations.stats import HIST_BIN, SiteAccumulator
from prunescope.activations.study import CharTransformer, StudyConfig, run_study
from prunescope.activations.swap import swap_activations
from prunescope.errors import PrunescopeError

TEXT = ("Activations prune neurons for every input, weights prune synapses once. " * 40)


def _blocks(n: int = 4, seqlen: int = 32, vocab: int = 384, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _capture(model: nn.Module, names: list[str], blocks: torch.Tensor, pre: bool) -> dict[str, torch.Tensor]:
    """The full tensors at the named modules (outputs, or inputs when ``pre``), for reference values."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        if pre:
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().clone())))
        else:
            handles.append(m.register_forward_hook(lambda mod, a, o, n=n: seen[n].append(o.detach().clone())))
    with torch.no_grad():
        model(input_ids=blocks)
    for h in handles:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in seen.items()}


def test_accumulator_counts_match_direct_computation() -> None:
    x = torch.randn(300, 20)
    x[:, 3] = -x[:, 3].abs()  # neuron 3 never positive
    x[:, 5] = 0.0  # neuron 5 always exactly zero
    x[::7, 0] = 0.0
    acc = SiteAccumulator("s", "activation", "relu", ("s",), (0.05, 0.25), 0.25, sample_every=1)
    acc.update(x[:100])
    acc.update(x[100:])
    r = acc.result()
    rms = float(x[:100].pow(2).mean().sqrt())  # fixed from the first batch
    assert r.rms == pytest.approx(rms)
    assert r.zero_frac == pytest.approx(float((x == 0).float().mean()))
    for e in (0.05, 0.25):
        assert r.near_zero_frac[f"{e:g}"] == pytest.approx(float((x.abs() < e * rms).float().mean()), abs=2e-3)
    assert r.dead_neurons == 2  # neurons 3 and 5
    assert r.dead_neurons_eps == 1  # only neuron 5 never leaves the band
    per_token = (x.abs() < 0.25 * rms).float().mean(-1)
    assert r.token_sparsity_mean == pytest.approx(float(per_token.mean()), abs=1e-6)
    assert sum(r.token_sparsity_hist) == 300


def test_sampling_every_kth_token_keeps_exact_zero_count() -> None:
    x = torch.relu(torch.randn(400, 16))
    acc = SiteAccumulator("s", "activation", "relu", ("s",), (0.1,), 0.1, sample_every=4)
    acc.update(x)
    r = acc.result()
    assert r.tokens == 400 and r.sampled_tokens == 100
    assert r.zero_frac == pytest.approx(float((x == 0).float().mean()))  # every token
    assert r.near_zero_frac["0.1"] == pytest.approx(float((x[:100].abs() < 0.1 * r.rms).float().mean()), abs=2e-3)
    acc.update(x)  # the next batch samples the next contiguous run
    assert acc.sampled == 200 and acc.batches == 2


def test_profile_tiny_llama_sites_and_shared_inputs(tiny_model: nn.Module) -> None:
    p = profile(tiny_model, _blocks(), sample_every=1, batch_size=2, progress=False)
    by_name = {s.name: s for s in p.sites}
    qkv = by_name["model.layers.0.self_attn.q_proj"]
    assert qkv.modules == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                           "model.layers.0.self_attn.v_proj")
    assert by_name["model.layers.0.mlp.gate_proj"].modules == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert "model.layers.0.self_attn.k_proj" not in by_name
    assert [s.name for s in p.activation_sites()] == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    assert all(s.tokens == 128 for s in p.sites)  # both batches reached every site
    assert len(p.linears) == 2 * 7 + 1  # every Linear reported, lm_head included


def test_gated_mlp_gate_and_product_match_direct_values(tiny_model: nn.Module) -> None:
    swap_activations(tiny_model, "relu")  # exact zeros make the check sharp
    blocks = _blocks()
    ref_act = _capture(tiny_model, ["model.layers.1.mlp.act_fn"], blocks, pre=False)["model.layers.1.mlp.act_fn"]
    ref_in = _capture(tiny_model, ["model.layers.1.mlp.down_proj"], blocks, pre=True)["model.layers.1.mlp.down_proj"]
    p = profile(tiny_model, blocks, eps=(0.05,), token_eps=0.05, sample_every=1, batch_size=4, progress=False)
    by_name = {s.name: s for s in p.sites}
    act, prod = by_name["model.layers.1.mlp.act_fn"], by_name["model.layers.1.mlp.down_proj"]
    assert act.activation == "relu"
    assert act.zero_frac == pytest.approx(float((ref_act == 0).float().mean()))
    assert prod.zero_frac == pytest.approx(float((ref_in == 0).float().mean()))
    assert 0.3 < act.zero_frac < 0.7  # ReLU on random pre-activations zeroes about half
    assert prod.zero_frac >= act.zero_frac  # a zero gate zeroes the product
    rms = float(ref_in.pow(2).mean().sqrt())
    assert prod.near_zero_frac["0.05"] == pytest.approx(float((ref_in.abs() < 0.05 * rms).float().mean()), abs=2e-3)
    assert act.dead_neurons == int((ref_act.amax(0) <= 0).sum())


def test_dead_neurons_found_in_relu_network() -> None:
    torch.manual_seed(0)
    model = CharTransformer(vocab=20, seqlen=16, d=16, layers=2, heads=2, act=nn.ReLU).eval()
    with torch.no_grad():
        model.blocks[0].fc_in.bias[[1, 7]] = -1e4  # two neurons that can never fire
    p = profile(model, _blocks(4, 16, vocab=20), sample_every=1, batch_size=4, progress=False)
    acts = p.activation_sites()
    assert [s.name for s in acts] == ["blocks.0.act", "blocks.1.act"]
    assert acts[0].dead_neurons >= 2 and acts[0].dead_neurons_eps >= 2
    assert acts[0].firing_min == 0.0


def test_weight_x_input_density_exact_macs(tiny_model: nn.Module) -> None:
    swap_activations(tiny_model, "relu")
    down = tiny_model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, ::2] = 0  # half the columns pruned
        down.weight[0, 1] = 0
    blocks = _blocks()
    x = _capture(tiny_model, ["model.layers.0.mlp.down_proj"], blocks, pre=True)["model.layers.0.mlp.down_proj"]
    p = profile(tiny_model, blocks, sample_every=1, batch_size=4, progress=False)
    cost = next(c for c in p.linears if c.name == "model.layers.0.mlp.down_proj")
    w = down.weight != 0  # [out, in]
    expected = float(((x != 0).float() @ w.sum(0).float()).sum()) / (x.shape[0] * w.numel())
    assert cost.weight_density == pytest.approx(float(w.float().mean()))
    assert cost.input_density == pytest.approx(float((x != 0).float().mean()))
    assert cost.effective_mac_frac == pytest.approx(expected, rel=1e-5)
    assert cost.product == pytest.approx(cost.weight_density * cost.input_density)


def test_threshold_for_synthetic_histogram() -> None:
    values = torch.logspace(-3, 1, 10001)  # log-uniform |x| over four decades
    hist = torch.zeros(threshold.LOG_BINS + 1, dtype=torch.float64)
    hist[:-1] = torch.histc(values.log10(), threshold.LOG_BINS, threshold.LOG_MIN, threshold.LOG_MAX).double()
    assert threshold.threshold_for(hist, 0.0) == 0.0
    assert threshold.threshold_for(hist, 0.5) == pytest.approx(0.1, rel=0.01)
    assert threshold.threshold_for(hist, 0.25) == pytest.approx(10**-2, rel=0.01)
    hist[-1] = 10001  # as many exact zeros: half the mass is already zero
    assert threshold.threshold_for(hist, 0.5) == 0.0
    assert threshold.threshold_for(hist, 0.75) == pytest.approx(0.1, rel=0.01)


def test_calibrated_thresholds_reach_target(tiny_model: nn.Module) -> None:
    blocks = _blocks(8, 32)
    names = threshold.default_targets(tiny_model)
    assert "lm_head" not in names and len(names) == 14
    hists = threshold.calibrate_histograms(tiny_model, names, blocks, progress=False)
    first = "model.layers.0.self_attn.q_proj"  # its input does not depend on other thresholds
    x = _capture(tiny_model, [first], blocks, pre=True)[first]
    with torch.no_grad():
        dense = tiny_model(input_ids=blocks).logits
    for target in (0.25, 0.5, 0.65):
        t = threshold.thresholds_for(hists, target)
        assert float((x.abs() < t[first]).float().mean()) == pytest.approx(target, abs=0.01)
        counter = threshold.SparsityCounter()
        with threshold.thresholded(tiny_model, t, counter), torch.no_grad():
            sparse = tiny_model(input_ids=blocks).logits
        assert counter.sparsity == pytest.approx(target, abs=0.06)
        assert not torch.allclose(sparse, dense)
    with threshold.thresholded(tiny_model, threshold.thresholds_for(hists, 0.0)), torch.no_grad():
        assert torch.equal(tiny_model(input_ids=blocks).logits, dense)
    with torch.no_grad():  # hooks removed on exit
        assert torch.equal(tiny_model(input_ids=blocks).logits, dense)


def test_swap_replaces_every_activation(tiny_model: nn.Module) -> None:
    before = swap_activations(tiny_model, "gelu")
    assert before == {"model.layers.0.mlp.act_fn": "silu", "model.layers.1.mlp.act_fn": "silu"}
    assert all(isinstance(layer.mlp.act_fn, nn.GELU) for layer in tiny_model.model.layers)
    assert set(find_activations(tiny_model).values()) == {"gelu"}
    with pytest.raises(PrunescopeError, match="relu, gelu, silu"):
        swap_activations(tiny_model, "tanh")


def test_no_activation_names_found_module_types() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 10)

        def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
            return self.lin(self.emb(input_ids))

    with pytest.raises(PrunescopeError, match="no recognised activation.*Embedding, Linear"):
        profile(Plain(), torch.zeros(1, 4, dtype=torch.long), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": (0.0,)}, "eps must be a positive"),
    ({"eps": (-0.1,)}, "eps must be a positive"),
    ({"eps": (HIST_BIN / 10,)}, "outside the histogram"),
    ({"token_eps": 0.0}, "eps must be a positive"),
    ({"sample_every": 0}, "sample_every"),
    ({"thresholds": (1.0,)}, r"target sparsity must be in \[0, 1\)"),
    ({"thresholds": (-0.1,)}, r"target sparsity must be in \[0, 1\)"),
    ({"swap": "tanh"}, "unknown --swap"),
    ({"tokens": 10}, "at least one window"),
])
def test_config_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(PrunescopeError, match=match):
        ActivationsConfig(**kwargs)


def test_text_shorter_than_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words here", encoding="utf-8")
    config = ActivationsConfig(model=str(tiny_model_dir), text=str(short), tokens=64, seqlen=32)
    with pytest.raises(PrunescopeError, match="fewer than the 64 requested"):
        run_activations(config)


def test_job_threshold_and_swap(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    config = ActivationsConfig(model=str(tiny_model_dir), text=str(text), tokens=128, seqlen=32, swap="relu",
                               thresholds=(0.0, 0.5), calib_text=str(text), calib_tokens=128,
                               eval_text=str(text), eval_tokens=128, eval_seqlen=32)
    r = run_activations(config)
    assert [p.target for p in r.threshold.points] == [0.0, 0.5]
    assert r.threshold.points[0].actual == 0.0 and 0.4 < r.threshold.points[1].actual < 0.6
    assert r.swap.ppl_before == r.threshold.points[0].ppl  # the same dense model, the same text
    after = r.swap.profile_after.activation_sites()
    assert all(s.activation == "relu" and s.zero_frac > 0.2 for s in after)
    assert all(s.zero_frac == 0.0 for s in r.profile.activation_sites())  # SiLU has no exact zeros


def test_cli_profile_writes_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(["-q", "activations", str(tiny_model_dir), "--text", str(text), "--tokens", "128",
                   "--seqlen", "32", "--eps", "0.01,0.1", "--token-eps", "0.1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    layer = report["profile"]["sites"][0]
    assert {"name", "activation", "zero_frac", "near_zero_frac", "dead_neurons"} <= set(layer)
    assert set(layer["near_zero_frac"]) == {"0.01", "0.1"}
    assert {s["activation"] for s in report["profile"]["sites"]} == {"silu", "input"}
    for name in ("report.md", "sparsity.png", "histograms.png", "dead.png"):
        assert (out / name).stat().st_size > 0
    assert "model.layers.1.mlp.act_fn" in (out / "report.md").read_text()


def test_cli_profiles_pruned_sparse_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Joined with weight pruning: a checkpoint from the prune job reports its weight density."""
    from prunescope import formats, models
    from prunescope.pruning.job import magnitude_masks, select_linear_layers
    from prunescope.pruning.apply import apply_masks
    from prunescope.pruning.patterns import SparsityPattern

    model, tok = models.load(str(tiny_model_dir))
    layers = select_linear_layers(model)
    apply_masks(model, magnitude_masks(layers, SparsityPattern(0.5), "layer"))
    formats.save_sparse(model, tmp_path / "pruned", tokenizer=tok)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["-q", "activations", str(tmp_path / "pruned"), "--text", str(text), "--tokens", "64",
                     "--seqlen", "32", "--sample-every", "1", "--out", str(out)]) == 0
    costs = {c["name"]: c for c in json.loads((out / "report.json").read_text())["profile"]["linears"]}
    down = costs["model.layers.0.mlp.down_proj"]
    assert down["weight_density"] == pytest.approx(0.5, abs=0.01)
    assert costs["lm_head"]["weight_density"] == 1.0  # the head is not pruned
    assert down["effective_mac_frac"] == pytest.approx(down["product"], abs=0.02)  # SiLU: inputs all non-zero
    assert "effective MACs" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--eps", "0"], "eps must be a positive"),
    (["--threshold", "0.5,1.2"], "target sparsity must be in"),
    (["--tokens", "100000"], "fewer than the 100000 requested"),
])
def test_cli_bad_input_exit_2(tiny_model_dir: Path, tmp_path: Path, capsys, argv: list[str], match: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc = cli.main(["activations", str(tiny_model_dir), "--text", str(text), "--seqlen", "32",
                   "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert "prunescope activations: error:" in err and len(err.strip().splitlines()) == 1
    assert match.split(".*")[0] in err


def test_study_tiny(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    config = StudyConfig(text=str(text), activations=("relu", "gelu"), seeds=(0, 1), steps=12, batch=4,
                         seqlen=16, d_model=16, n_heads=2, eval_windows=4)
    r = run_study(config)
    assert [(x.activation, x.seed) for x in r.runs] == [("relu", 0), ("gelu", 0), ("relu", 1), ("gelu", 1)]
    relu, gelu = r.summary
    assert relu.zero_frac > 0.2 and gelu.zero_frac == 0.0
    assert all(x.val_loss < x.loss_curve[0] for x in r.runs)  # it learned something
    assert relu.val_loss_std > 0  # seeds differ


def test_cli_study_dispatch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 5, encoding="utf-8")
    out = tmp_path / "study"
    rc = cli.main(["-q", "activations", "study", "--study-text", str(text), "--acts", "relu,mish", "--seeds", "0",
                   "--steps", "5", "--study-batch", "4", "--study-seqlen", "16", "--d-model", "16", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["activation"] for s in report["summary"]] == ["relu", "mish"]
    assert (out / "study.png").stat().st_size > 0
    assert cli.main(["activations", "study", "--acts", "swish", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.integration
def test_bundled_profile(bundled) -> None:
    model, tok = bundled
    from prunescope import data

    blocks = data.eval_blocks(data.tokenize(tok, data.load_text()[:5000]), 128, 128)  # [1, 128]
    p = profile(model, blocks, batch_size=1, progress=False)
    acts = p.activation_sites()
    assert len(acts) == 30 and {s.activation for s in acts} == {"silu"} and acts[0].width == 1536
    assert all(s.zero_frac < 0.01 for s in acts)  # SiLU: (almost) no exact zeros
    assert all(0.0 < s.near_zero_frac["0.1"] < 1.0 for s in acts)
    downs = [s for s in p.sites if s.name.endswith("down_proj")]
    assert len(downs) == 30
    assert len(p.linears) == 30 * 7 + 1


def test_calibration_histogram_counts_every_value_and_zeros(tiny_model: nn.Module) -> None:
    swap_activations(tiny_model, "relu")  # down_proj inputs get exact zeros
    blocks = _blocks(2, 16)
    name = "model.layers.0.mlp.down_proj"
    x = _capture(tiny_model, [name], blocks, pre=True)[name]
    hists = threshold.calibrate_histograms(tiny_model, [name, "model.layers.0.mlp.up_proj"], blocks, progress=False)
    assert int(hists[name].sum()) == x.numel()
    assert int(hists[name][-1]) == int((x == 0).sum()) > 0
    assert int(hists["model.layers.0.mlp.up_proj"].sum()) == 2 * 16 * 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_job_on_cuda_matches_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    kw = dict(model=str(tiny_model_dir), text=str(text), tokens=128, seqlen=32, thresholds=(0.5,),
              calib_text=str(text), calib_tokens=128, eval_text=str(text), eval_tokens=128, eval_seqlen=32)
    cpu = run_activations(ActivationsConfig(device="cpu", **kw))
    gpu = run_activations(ActivationsConfig(device="cuda", **kw))
    for a, b in zip(cpu.profile.activation_sites(), gpu.profile.activation_sites()):
        assert a.near_zero_frac == pytest.approx(b.near_zero_frac, abs=0.02)
    assert gpu.threshold.points[0].ppl == pytest.approx(cpu.threshold.points[0].ppl, rel=0.01)
