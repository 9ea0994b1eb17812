import pytest
import torch

from prunescope import models
from prunescope.pruning import calib


def _blocks(n=5, seqlen=12, seed=0):
    return torch.randint(0, 384, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_layer_by_layer_reproduces_the_full_forward(tiny_model):
    blocks = _blocks()
    adapter = models.adapter_for(tiny_model)
    inputs = calib.capture_first_layer_inputs(tiny_model, adapter, blocks, batch_size=2)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]  # batched, last batch partial
    assert inputs.nbytes() == 5 * 12 * 32 * 4
    with torch.no_grad():
        embeds = tiny_model.model.embed_tokens(blocks)
        assert torch.equal(torch.cat(inputs.hidden), embeds)
        for layer in adapter.layers(tiny_model):
            inputs = calib.run_layer(layer, inputs)
        ref = tiny_model.model(input_ids=blocks, use_cache=False).last_hidden_state
        assert torch.allclose(tiny_model.model.norm(torch.cat(inputs.hidden)), ref, atol=1e-5)


def _direct_inputs(model, blocks, names):
    """Inputs of the named modules during one ordinary full forward: name -> [tokens, in]."""
    seen = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).clone())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=blocks, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_stats_match_inputs_seen_in_a_full_forward(tiny_model):
    blocks = _blocks()
    adapter = models.adapter_for(tiny_model)
    layer = adapter.layers(tiny_model)[0]
    names = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")]
    modules = {n: tiny_model.get_submodule(n) for n in names}
    inputs = calib.capture_first_layer_inputs(tiny_model, adapter, blocks, batch_size=2)
    stats = calib.collect_stats(layer, modules, inputs, hessian=True)
    direct = _direct_inputs(tiny_model, blocks, names)
    hessians: dict[int, torch.Tensor] = {}
    for name in names:
        x = direct[name]  # [tokens, in]
        assert stats[name].tokens == 60
        assert torch.allclose(stats[name].sq_sum, x.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        if id(stats[name]) not in hessians:  # taken once per object (in place)
            hessians[id(stats[name])] = stats[name].hessian()
        assert torch.allclose(hessians[id(stats[name])], 2 * x.T @ x / 60, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="taken already"):
        stats[names[0]].hessian()
    # q and k read the same tensor: one shared statistics object, counted once
    assert stats[names[0]] is stats[names[1]]
    assert stats[names[2]] is not stats[names[0]]


def test_wanda_stats_skip_the_hessian(tiny_model):
    adapter = models.adapter_for(tiny_model)
    layer = adapter.layers(tiny_model)[1]
    name = "model.layers.1.mlp.up_proj"
    inputs = calib.capture_first_layer_inputs(tiny_model, adapter, _blocks(2), batch_size=2)
    stats = calib.collect_stats(layer, {name: tiny_model.get_submodule(name)}, inputs, hessian=False)
    assert stats[name].xtx is None and stats[name].sq_sum.shape == (32,)


def test_stop_early_skips_the_rest_of_the_layer_and_keeps_the_statistics(tiny_model):
    """With stop_early the forward ends once every module saw its input (the MLP never runs
    when only attention is read), and the statistics equal those of a full pass."""
    blocks = _blocks()
    adapter = models.adapter_for(tiny_model)
    inputs = calib.capture_first_layer_inputs(tiny_model, adapter, blocks, batch_size=2)
    layer = adapter.layers(tiny_model)[0]
    attention = {f"self_attn.{p}": layer.get_submodule(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")}
    calls = []
    handle = layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        early = calib.collect_stats(layer, attention, inputs, hessian=True, stop_early=True)
        assert calls == []
        full = calib.collect_stats(layer, attention, inputs, hessian=True)
        assert len(calls) == len(inputs.hidden)
    finally:
        handle.remove()
    for name in attention:
        assert torch.equal(early[name].xtx, full[name].xtx) and early[name].tokens == full[name].tokens


def test_sparsegpt_writer_first_passes_equal_one_pass(tiny_model):
    """SparseGPT collects the MLP writer's Hessian alone first (memory); the weights are the
    one-pass weights bit for bit, since pruning the layer's last Linear changes no other input."""
    import copy

    from prunescope.pruning import job
    from prunescope.pruning.patterns import SparsityPattern

    blocks = _blocks(n=4, seqlen=16)
    adapter = models.adapter_for(tiny_model)
    one = copy.deepcopy(tiny_model)
    for model, split in ((tiny_model, True), (one, False)):
        inputs = calib.capture_first_layer_inputs(model, adapter, blocks, batch_size=2)
        layer = adapter.layers(model)[0]
        targets = {n: m for n, m in model.named_modules() if n.startswith("model.layers.0.")
                   and isinstance(m, torch.nn.Linear)}
        if split:
            assert [len(g) for g, _ in job._writer_first(model, targets)] == [1, len(targets) - 1]
            job._prune_step(model, layer, targets, inputs, "sparsegpt", SparsityPattern(0.5), "layer")
        else:
            stats = calib.collect_stats(layer, targets, inputs, hessian=True)
            job._prune_decoder_layer(model, targets, stats, "sparsegpt", SparsityPattern(0.5), "layer")
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), one.state_dict().items()):
        assert torch.equal(a, b), name
