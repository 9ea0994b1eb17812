import copy

import pytest
import torch

from prunescope.pruning import job as pipeline, masks, scoring
from prunescope.errors import PrunescopeError
from prunescope.pruning.job import PruneConfig, run_prune
from prunescope.pruning.patterns import SparsityPattern
from prunescope.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def _config(text_file):
    def make(**kw):
        base = dict(model="tiny", calib_samples=4, calib_seqlen=16, calib_batch_size=2, eval_tokens=64,
                    eval_seqlen=16, calib_text=text_file, eval_text=text_file)
        base.update(kw)
        return PruneConfig(**base)

    return make


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(method="obs"), "unknown method 'obs'; choose one of magnitude, wanda, ria, sparsegpt"),
        (dict(method="wanda", scope="global"), "scope 'global' is not available for wanda"),
        (dict(pattern="3:2"), "0 < N < M"),
        (dict(pattern="2:4", sweep=(0.3,)), "cannot be combined with an N:M pattern"),
        (dict(sweep=(0.3,), evaluate=False), "cannot be combined with --no-eval"),
        (dict(sweep=(1.2,)), "sweep sparsity must be in (0, 1)"),
        (dict(sweep_methods=("wanda", "sparsegpt")), "several methods need --sweep"),
        (dict(calib_samples=0), "calibration needs samples >= 1"),
    ],
)
def test_config_rejects_bad_input(_config, kw, message):
    with pytest.raises(PrunescopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(**kw)


def test_defaults_are_sparsegpt_half_and_magnitude_is_global():
    cfg = PruneConfig()
    assert cfg.sparsity_pattern == SparsityPattern(0.5)
    assert cfg.method == "sparsegpt" and cfg.effective_scope == "block" and cfg.calibrated
    assert PruneConfig(method="magnitude").effective_scope == "global"
    assert PruneConfig(method="wanda").effective_scope == "row"
    assert PruneConfig(method="magnitude", pattern="2:4", scope="layer").effective_scope == "group"


@pytest.mark.parametrize(
    "method, pattern, sparsity",
    [("magnitude", "unstructured", 0.4), ("wanda", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.6),
     ("wanda", "4:8", None), ("sparsegpt", "2:4", None)],
)
def test_run_prune_end_to_end(_config, tok, method, pattern, sparsity):
    model = tiny_llama(vocab_size=max(384, len(tok)))
    cfg = _config(method=method, pattern=pattern, sparsity=sparsity)
    result, pruned = run_prune(cfg, model, tok)
    assert pruned is model
    assert result.sparsity_actual == pytest.approx(cfg.sparsity_pattern.sparsity, abs=2e-3)
    assert result.pattern == cfg.sparsity_pattern.label and result.scope == cfg.effective_scope
    assert result.dense_ppl > 1 and result.pruned_ppl > 1 and result.pruned_ppl != result.dense_ppl
    assert len(result.layers) == 14
    if method != "magnitude":
        assert result.calib_samples == 4 and result.calib_seqlen == 16
        assert result.calib_activation_bytes == 2 * 4 * 16 * 32 * 4
    for ls in result.layers:  # row/group comparison: every layer at the requested sparsity
        if method != "magnitude":
            assert ls.sparsity == pytest.approx(cfg.sparsity_pattern.sparsity, abs=0.02), ls.name


def test_wanda_is_sequential_layer_1_sees_pruned_layer_0(tok):
    """Layer 1's mask must come from inputs produced by the already-pruned layer 0."""
    model = tiny_llama(vocab_size=max(384, len(tok)))
    reference = copy.deepcopy(model)
    blocks = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    layers = pipeline.select_linear_layers(model)
    pipeline.prune_model(model, layers, "wanda", SparsityPattern(0.5), "row", blocks, 2)
    # replay by hand on the reference: prune layer 0 from the pruned weights, then read layer-1 inputs
    with torch.no_grad():
        for name, module in layers.items():
            if name.startswith("model.layers.0."):
                reference.get_submodule(name).weight.copy_(module.weight)
    name = "model.layers.1.mlp.down_proj"
    seen = {}
    handle = reference.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        reference(input_ids=blocks, use_cache=False)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])  # [tokens, in]
    dense_w = reference.get_submodule(name).weight
    expected = masks.row_keep_masks(scoring.wanda(dense_w, x.pow(2).sum(0)), 0.5)
    assert torch.equal(model.get_submodule(name).weight != 0, expected)


def test_skip_incompatible_nm_layers(_config, tok):
    model = tiny_llama(vocab_size=max(384, len(tok)), intermediate_size=60)  # down_proj in=60
    with pytest.raises(PrunescopeError, match=r"model.layers.0.mlp.down_proj.weight has shape \(32, 60\)"):
        run_prune(_config(method="wanda", pattern="4:8", evaluate=False), model, tok)
    result, _ = run_prune(_config(method="wanda", pattern="4:8", evaluate=False, skip_incompatible=True), model, tok)
    assert result.skipped_layers == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert len(result.layers) == 12 and result.sparsity_actual == pytest.approx(0.5)
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()


def test_calibration_text_too_short(_config, tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    model = tiny_llama(vocab_size=max(384, len(tok)))
    with pytest.raises(PrunescopeError, match="too short for 4 samples of 16 tokens"):
        run_prune(_config(method="wanda", calib_text=str(short)), model, tok)


def test_calibrated_methods_refuse_layers_outside_the_decoder(_config, tok):
    model = tiny_llama(vocab_size=max(384, len(tok)))
    model.model.extra = torch.nn.Linear(4, 4)  # a Linear outside model.layers
    with pytest.raises(PrunescopeError, match="model.extra is outside them"):
        run_prune(_config(method="sparsegpt", evaluate=False), model, tok)


def test_sweep_prunes_from_dense_each_time(_config, tok):
    model = tiny_llama(vocab_size=max(384, len(tok)))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _config(method="magnitude", sparsity=0.5, sweep=(0.2, 0.7), sweep_methods=("magnitude", "wanda"))
    result, _ = run_prune(cfg, model, tok)
    assert [(p.method, p.sparsity) for p in result.sweep] == [
        ("magnitude", 0.2), ("magnitude", 0.7), ("wanda", 0.2), ("wanda", 0.7)
    ]
    for p in result.sweep:
        assert p.sparsity_actual == pytest.approx(p.sparsity, abs=0.015) and p.ppl > 1  # per-row rounding
    assert result.sparsity_actual == pytest.approx(0.5, abs=1e-3)
    # the final state is the main prune of the dense weights: kept entries are unchanged
    for name, ls in ((ls.name, ls) for ls in result.layers):
        w = model.get_submodule(name).weight
        assert torch.equal(w[w != 0], dense[name + ".weight"][w != 0])


def test_save_writes_a_sparse_checkpoint_that_loads_back(_config, tok, tmp_path):
    formats = pytest.importorskip("prunescope.formats", reason="formats.py (the sparse checkpoint writer) is missing")
    model = tiny_llama(vocab_size=max(384, len(tok)))
    result, pruned = run_prune(_config(method="wanda", pattern="2:4", evaluate=False, save_dir=tmp_path / "m"), model, tok)
    assert result.checkpoint["file_bytes"] < result.checkpoint["dense_file_bytes"]
    assert result.checkpoint["path"] == str(tmp_path / "m")
    loaded = formats.load_sparse(tmp_path / "m")
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
