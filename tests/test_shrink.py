"""Structured shrinking on tiny random models of every supported family: exact removal, a folder
that plain transformers reloads to the same logits, compensation, sequential calibration."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunescope import families, models
from prunescope.errors import PrunescopeError
from prunescope.families import KV, MLP, Q
from prunescope.pruning import apply, calib, shrink, structured
from prunescope.pruning.shrink import ShrinkConfig, ShrinkPlan, make_plan, shrink_model
from prunescope.testing import FAMILIES, tiny_family_model

HEADS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
IDS = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
BLOCKS = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(1))


def _config(**kw) -> ShrinkConfig:
    base = dict(model="tiny", multiple_of=8, calib_samples=4, calib_seqlen=24, calib_batch_size=2,
                evaluate=False, latency_rounds=0)
    return ShrinkConfig(**{**base, **kw})


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _direct_kept(layer, layout, keep: int) -> torch.Tensor:
    """The magnitude choice written out by hand: squared norm of every weight a unit owns."""
    total = torch.zeros(layout.count, dtype=torch.float64)
    for cut in layout.cuts:
        module = layer.get_submodule(cut.module)
        w = module.weight.detach().double()
        if families.is_conv1d(module):
            w = w.T  # [out, in]
        rows = w if cut.side == "out" else w.T  # [features, other]
        feats = rows.pow(2).sum(1)
        if cut.side == "out" and getattr(module, "bias", None) is not None:
            feats = feats + module.bias.detach().double().pow(2)
        total += feats[cut.offset : cut.offset + layout.count * layout.width].reshape(layout.count, -1).sum(1)
    return torch.sort(torch.argsort(total, descending=True, stable=True)[:keep]).values


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_is_exact_zeroing_of_the_removed_units(family):
    """Shrunk logits equal the dense model with the removed units' writer columns zeroed."""
    model = tiny_family_model(family)
    reference = copy.deepcopy(model)
    heads = family in HEADS
    config = _config(mlp=0.5, kv_groups=1 if heads else 0, criterion="magnitude", compensation="none")
    plan = make_plan(config, model)
    layouts = families.family_for(model).layouts(model.config)
    for layer in models.adapter_for(reference).layers(reference):
        kept = _direct_kept(layer, layouts[MLP], 32)
        apply.set_writer_columns(layer, layouts[MLP].writer, kept, None)
        if heads:  # a KV group: its kv head's own weights plus its two query heads
            per_head = torch.zeros(4, dtype=torch.float64)
            for cut in layouts[Q].cuts:
                m = layer.get_submodule(cut.module)
                w = m.weight.detach().double()
                rows = w if cut.side == "out" else w.T
                feats = rows.pow(2).sum(1) + (m.bias.detach().double().pow(2) if cut.side == "out" and m.bias is not None else 0)
                per_head += feats[cut.offset : cut.offset + 32].reshape(4, 8).sum(1)
            own = torch.zeros(2, dtype=torch.float64)
            for cut in layouts[KV].cuts:
                m = layer.get_submodule(cut.module)
                feats = m.weight.detach().double().pow(2).sum(1)
                if m.bias is not None:
                    feats = feats + m.bias.detach().double().pow(2)
                own += feats[cut.offset : cut.offset + 16].reshape(2, 8).sum(1)
            group = int(torch.argmax(per_head.reshape(2, 2).sum(1) + own))
            cols = structured.unit_columns(torch.tensor([2 * group, 2 * group + 1]), 8)
            apply.set_writer_columns(layer, layouts[Q].writer, cols, None)
    shrunk, _, _ = shrink_model(model, config, plan, None)
    assert plan.shrunk.intermediate == 32
    torch.testing.assert_close(_logits(shrunk), _logits(reference), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_unit_gives_the_dense_logits(family):
    model = tiny_family_model(family)
    dense = _logits(model)
    base = make_plan(_config(mlp=0.5), model)
    kinds = (Q, MLP) if family in HEADS else (MLP,)
    plan = ShrinkPlan(base.family, base.dense, base.dense, base.dense_layers, 0, kinds, (), "none")
    shrunk, _, _ = shrink_model(model, _config(mlp=0.5, compensation="none"), plan, BLOCKS)
    torch.testing.assert_close(_logits(shrunk), dense, rtol=1e-5, atol=1e-5)


_RELOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out[folder] = model(input_ids=ids).logits.tolist()
    assert not any(m.startswith("prunescope") for m in sys.modules), "prunescope was imported"
    print(json.dumps(out))
""")


def test_every_family_reloads_in_plain_transformers_with_the_same_logits(tmp_path):
    """Shrink (channels, heads where the family has them, one layer), save_pretrained, reload in a
    fresh interpreter that never imports prunescope, compare logits."""
    folders, expected = [], {}
    for family in FAMILIES:
        model = tiny_family_model(family)
        config = _config(mlp=0.25, kv_groups=1 if family in HEADS else 0, drop_layers=1)
        shrunk, outcomes, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
        assert sum(o.new_index is None for o in outcomes) == 1
        folder = tmp_path / family
        shrink.save_model(shrunk, None, folder)
        folders.append(str(folder))
        expected[str(folder)] = _logits(shrunk)
        saved = json.loads((folder / "config.json").read_text())
        assert saved[families.family_for(shrunk).intermediate_key] == 48
        assert saved[families.family_for(shrunk).layers_key] == 2
        if family in HEADS:
            assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 1, 8)
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(IDS.tolist()), *folders],
        capture_output=True, text=True, timeout=300, check=True,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder in folders:
        torch.testing.assert_close(torch.tensor(got[folder]), expected[folder], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_bias_compensation_is_saved_as_biases(family, tmp_path):
    model = tiny_family_model(family)
    config = _config(mlp=0.5, kv_groups=1 if family == "llama" else 0, compensation="bias")
    plan = make_plan(config, model)
    shrunk, outcomes, _ = shrink_model(model, config, plan, BLOCKS)
    if family == "llama":
        assert plan.bias_flags == ("attention_bias", "mlp_bias")
        assert shrunk.config.mlp_bias and shrunk.config.attention_bias
        assert shrunk.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
        assert shrunk.model.layers[0].mlp.gate_proj.bias.abs().sum() == 0  # zeros elsewhere
    shrink.save_model(shrunk, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(shrunk), rtol=1e-5, atol=1e-5)
    assert all(o.mlp_error.bias < o.mlp_error.none for o in outcomes)


@pytest.mark.parametrize(
    "family, kw, message",
    [
        ("mistral", dict(compensation="bias"), "Mistral has no down_proj bias in plain transformers"),
        ("qwen3", dict(compensation="bias"), "Qwen3 has no down_proj bias"),
        ("phi3", dict(compensation="bias", mlp=0.0, kv_groups=1), "Phi-3 has no o_proj bias"),
        ("gpt2", dict(kv_groups=1), "GPT-2's config has no head_dim"),
        ("opt", dict(heads_per_group=1), "OPT's config has no head_dim"),
        ("llama", dict(kv_groups=2), "--kv-groups 2 must be below the model's 2 KV groups"),
        ("llama", dict(heads_per_group=2), "--heads-per-group 2 must be below the 2 query heads"),
        ("llama", dict(multiple_of=128), "--multiple-of 128 must be between 1 and the MLP width (64)"),
        ("llama", dict(mlp=None, target_params=0.8, multiple_of=128), "--multiple-of 128 must be between 1"),
        ("llama", dict(drop_layers=3), "would drop every one of the 3 layers"),
        ("llama", dict(mlp=0.01), "nothing would be removed"),
        ("llama", dict(mlp=0.0), "these options remove nothing"),
        ("llama", dict(mlp=None, target_params=0.01), "cannot be reached by shrinking the MLP"),
    ],
)
def test_plan_refuses_bad_sizes(family, kw, message):
    with pytest.raises(PrunescopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(_config(**{"mlp": 0.5, **kw}), tiny_family_model(family))


def test_gpt2_with_layer_index_scaling_cannot_drop_layers():
    model = tiny_family_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(PrunescopeError, match="scale_attn_by_inverse_layer_idx"):
        make_plan(_config(mlp=0.5, drop_layers=1), model)
    assert make_plan(_config(mlp=0.5), model).drop_layers == 0


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPTNeoXConfig

    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(PrunescopeError, match=r"does not support model type 'gpt_neox'.*Llama \(llama\).*GPT-2"):
        make_plan(_config(mlp=0.5), model)


@pytest.mark.parametrize("target, kw", [(0.76, dict()), (0.76, dict(kv_groups=1, compensation="bias")),
                                        (0.6, dict(drop_layers=1))])
def test_target_params_keeps_at_most_the_target(target, kw):
    """Counted on the saved model, compensation biases and dropped layers included; one more
    multiple of 8 channels would exceed the target."""
    before = sum(p.numel() for p in tiny_family_model("llama").model.layers.parameters())
    model = tiny_family_model("llama")
    config = _config(mlp=None, target_params=target, **kw)
    plan = make_plan(config, model)
    shrunk, _, _ = shrink_model(model, config, plan, BLOCKS)
    after = sum(p.numel() for p in shrunk.model.layers.parameters())
    assert after <= target * before
    layers = len(shrunk.model.layers)
    per_channel = 3 * 32 + (2 if kw.get("compensation") == "bias" else 0)  # gate/up rows, down column (+ biases)
    assert shrunk.config.intermediate_size < 64
    assert after + layers * 8 * per_channel > target * before


def test_target_params_met_by_dropped_layers_keeps_the_mlp_whole():
    model = tiny_family_model("llama")
    config = _config(mlp=None, target_params=0.7, drop_layers=1)  # 2 of 3 layers: 0.67 kept
    assert make_plan(config, model).shrunk.intermediate == 64


def test_dropping_layers_trims_only_per_layer_config_lists(tmp_path):
    model = tiny_family_model("qwen2", eos_token_id=[2, 5, 7])
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    config = _config(mlp=0.0, drop_layers=1)
    shrunk, outcomes, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    dropped = [o.index for o in outcomes if o.new_index is None]
    assert shrunk.config.eos_token_id == [2, 5, 7]
    assert shrunk.config.layer_types == [t for i, t in enumerate(model.config.layer_types) if i not in dropped]


def test_bfloat16_model_stays_bfloat16_and_reloads(tmp_path):
    tiny_family_model("llama").save_pretrained(tmp_path / "dense")  # loaded as users load bf16
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    config = _config(mlp=0.5, kv_groups=1, compensation="bias")
    shrunk, _, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    assert {p.dtype for p in shrunk.parameters()} == {torch.bfloat16}
    shrink.save_model(shrunk, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(shrunk))


def test_each_layer_sees_the_already_shrunk_layers_before_it(monkeypatch):
    model = tiny_family_model("llama")
    seen = {}
    original = shrink._LayerShrinker.__call__

    def spy(self, index, layer, inputs):
        seen[index] = [h.clone() for h in inputs.hidden]
        return original(self, index, layer, inputs)

    monkeypatch.setattr(shrink._LayerShrinker, "__call__", spy)
    config = _config(mlp=0.5, kv_groups=1)
    shrunk, _, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    first = calib.capture_first_layer_inputs(shrunk, models.adapter_for(shrunk), BLOCKS, 2)
    expected = calib.run_layer(shrunk.model.layers[0], first)
    for got, want in zip(seen[1], expected.hidden):
        torch.testing.assert_close(got, want)


def test_mlp_statistics_are_taken_after_the_attention_was_pruned(monkeypatch):
    """With heads and channels pruned, the down_proj inputs of a layer come from its pruned
    attention: the MLP error of lstsq is then what the final shrunk layer shows."""
    model = tiny_family_model("llama")
    calls = []
    original = calib.collect_stats

    def spy(layer, modules, inputs, hessian, means=False):
        calls.append((tuple(modules), layer.self_attn.o_proj.weight.detach().clone()))
        return original(layer, modules, inputs, hessian, means)

    monkeypatch.setattr(calib, "collect_stats", spy)
    config = _config(mlp=0.5, kv_groups=1)
    shrink_model(model, config, make_plan(config, model), BLOCKS)
    assert [c[0] for c in calls[:2]] == [("self_attn.o_proj",), ("mlp.down_proj",)]
    o_before, o_during_mlp = calls[0][1], calls[1][1]
    assert (o_during_mlp == 0).all(0).sum() == 16 and not (o_before == 0).all(0).any()


def test_shrunk_model_keeps_generating_with_the_kv_cache():
    model = tiny_family_model("qwen3")
    config = _config(mlp=0.5, kv_groups=1, drop_layers=1)
    shrunk, _, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    out = shrunk.generate(input_ids=IDS[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    with torch.no_grad():  # the cached decode agrees with a full forward on the generated text
        full = shrunk(input_ids=out[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(out[0, -1])


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    model = tiny_family_model("llama")
    original = type(model).save_pretrained

    def half_then_interrupt(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        shrink.save_model(model, None, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_bundled_model_shrinks_saves_and_reloads(bundled, tmp_path):
    """SmolLM2-135M: MLP 1536 -> 1152 and KV groups 3 -> 2 with flap + lstsq on a little
    calibration text; the saved folder reloads in plain transformers to the same logits."""
    from prunescope.families import Shape
    from prunescope.pruning.shrink import run_shrink

    model, tok = bundled
    config = ShrinkConfig(mlp=0.25, kv_groups=1, calib_samples=8, calib_seqlen=256, eval_tokens=2048,
                          latency_rounds=0, save_dir=tmp_path / "model")
    result, shrunk = run_shrink(config, copy.deepcopy(model), tok)
    assert result.shrunk_shape == Shape(1152, 6, 2)
    assert result.shrunk_params < 0.85 * result.dense_params
    assert result.dense_ppl < result.pruned_ppl < 3 * result.dense_ppl
    for layer in result.layers:  # in-sample, neither compensation can raise the output error
        for e in (layer.mlp_error, layer.attn_error):
            assert e.lstsq <= e.none and e.bias <= e.none
    mean = {c: sum(getattr(o.mlp_error, c) for o in result.layers) / 30 for c in ("none", "bias", "lstsq")}
    assert mean["lstsq"] < 0.6 * mean["bias"]  # the refit does far more than a mean correction
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, shrunk(input_ids=ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_shrink_on_cuda_matches_cpu():
    config = _config(mlp=0.5, kv_groups=1, drop_layers=1)
    cpu, _, _ = shrink_model(tiny_family_model("llama"), config, make_plan(config, tiny_family_model("llama")), BLOCKS)
    gpu_model = tiny_family_model("llama").cuda()
    gpu, _, _ = shrink_model(gpu_model, config, make_plan(config, gpu_model), BLOCKS)
    assert next(gpu.parameters()).is_cuda
    with torch.no_grad():
        got = gpu(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(got, _logits(cpu), rtol=1e-3, atol=1e-3)
