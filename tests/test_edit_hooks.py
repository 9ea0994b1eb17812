"""Edits of hidden outputs: hooks (applied) and the same edit folded into Hugging Face weights."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunescope import models
from prunescope.edit.hooks import Edit, Gate, LayerEdit, Units, applied, fold, load_edit, new_units, save_edit
from prunescope.errors import PrunescopeError
from prunescope.testing import tiny_family_model, tiny_llama

HIDDEN = 32
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


def _vec(seed: int, scale: float = 1.0) -> torch.Tensor:
    """A reproducible random [HIDDEN] vector."""
    return scale * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # [batch, seq, vocab]


def _layer_output(model: torch.nn.Module, index: int) -> torch.Tensor:
    """The hidden states decoder layer ``index`` returns, captured with a forward hook."""
    captured: list[torch.Tensor] = []

    def grab(_m, _args, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    handle = models.adapter_for(model).layers(model)[index].register_forward_hook(grab)
    try:
        _logits(model)
    finally:
        handle.remove()
    return captured[0]  # [batch, seq, hidden]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _mixed_edit() -> Edit:
    return Edit([
        LayerEdit(0, add=_vec(1, 0.5), direction=_vec(2), ablate_scale=1.0),
        LayerEdit(1, add=_vec(3, 0.3)),
        LayerEdit(2, direction=_vec(4), ablate_scale=0.5),
    ])


def test_add_shifts_the_layer_output_by_exactly_add():
    model = tiny_llama(num_layers=3)
    add = _vec(0)
    before = _layer_output(model, 1)
    with applied(model, Edit([LayerEdit(1, add=add)])):
        after = _layer_output(model, 1)
    torch.testing.assert_close(after, before + add, atol=1e-5, rtol=0)
    torch.testing.assert_close(_layer_output(model, 1), before, atol=0, rtol=0)  # edit gone


def test_direction_is_removed_from_both_writers():
    model = tiny_llama(num_layers=2)
    d = _vec(5)
    layer = models.adapter_for(model).layers(model)[0]
    paths = ("self_attn.o_proj", "mlp.down_proj")
    seen: dict[str, torch.Tensor] = {}

    def capture() -> list:
        return [layer.get_submodule(p).register_forward_hook(
            lambda _m, _a, out, p=p: seen.__setitem__(p, out)) for p in paths]

    handles = capture()
    _logits(model)
    assert all((seen[p] @ d).abs().max() > 1e-3 for p in paths)  # unedited outputs have a d part
    [h.remove() for h in handles]
    with applied(model, Edit([LayerEdit(0, direction=d)])):
        handles = capture()  # registered after the edit's hooks: sees the edited outputs
        _logits(model)
    [h.remove() for h in handles]
    assert all((seen[p] @ d).abs().max() < 1e-5 for p in paths)


def test_hooks_removed_after_block_and_after_exception():
    model = tiny_llama()
    base = _hook_count(model)
    edit = Edit([LayerEdit(0, add=_vec(0), direction=_vec(1)), LayerEdit(1, direction=_vec(2))])
    with applied(model, edit):
        assert _hook_count(model) == base + 5
    assert _hook_count(model) == base
    with pytest.raises(RuntimeError, match="boom"), applied(model, edit):
        raise RuntimeError("boom")
    assert _hook_count(model) == base


def test_gradients_flow_into_add():
    model = tiny_llama()
    model.requires_grad_(False)
    add = torch.zeros(HIDDEN, requires_grad=True)
    with applied(model, Edit([LayerEdit(0, add=add, direction=_vec(1))])):
        loss = model(IDS).logits.logsumexp(-1).mean()
    loss.backward()
    assert add.grad is not None and add.grad.abs().sum() > 0


def test_fold_equals_hooks_and_round_trips(tmp_path):
    model = tiny_family_model("llama")
    edit = _mixed_edit()
    with applied(model, edit):
        hooked = _logits(model)
    assert not torch.allclose(hooked, _logits(model), atol=1e-3)  # the edit does something
    folded = fold(model, edit)
    assert folded is not model and folded.config.mlp_bias is True
    torch.testing.assert_close(_logits(folded), hooked, atol=1e-5, rtol=0)
    folded.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-5, rtol=0)
    up = models.adapter_for(reloaded).layers(reloaded)[2].mlp.up_proj
    assert up.bias is not None and not up.bias.any()  # the flag's other biases are zero


def test_fold_in_place_when_the_bias_exists():
    model = tiny_family_model("llama", mlp_bias=True, attention_bias=True)
    edit = _mixed_edit()
    with applied(model, edit):
        hooked = _logits(model)
    assert fold(model, edit) is model
    torch.testing.assert_close(_logits(model), hooked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_pure_ablation_folds_without_biases(family):
    model = tiny_family_model(family)
    edit = Edit([LayerEdit(0, direction=_vec(1)), LayerEdit(2, direction=_vec(2), ablate_scale=0.7)])
    biases = sum(name.endswith("bias") for name, _ in model.named_parameters())
    with applied(model, edit):
        hooked = _logits(model)
    folded = fold(model, edit)
    assert folded is model
    assert sum(name.endswith("bias") for name, _ in folded.named_parameters()) == biases
    torch.testing.assert_close(_logits(folded), hooked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_add_folds_into_existing_biases_of_opt_and_gpt2(family):
    model = tiny_family_model(family)
    edit = Edit([LayerEdit(1, add=_vec(1, 0.5))])
    with applied(model, edit):
        hooked = _logits(model)
    assert fold(model, edit) is model
    torch.testing.assert_close(_logits(model), hooked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_direction_refused_where_the_attention_writer_is_unknown(family):
    model = tiny_family_model(family)
    edit = Edit([LayerEdit(0, direction=_vec(1))])
    with pytest.raises(PrunescopeError, match="no attention writer"):
        edit.check(model)
    with pytest.raises(PrunescopeError, match="no attention writer"), applied(model, edit):
        pass
    assert _hook_count(model) == 0


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_add_refused_where_no_mlp_bias_exists(family):
    model = tiny_family_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = Edit([LayerEdit(0, direction=_vec(2)), LayerEdit(1, add=_vec(1))])
    with pytest.raises(PrunescopeError, match=r"no mlp.down_proj bias .* measure the edit with hooks"):
        fold(model, edit)
    for key, value in model.state_dict().items():  # checked before anything changed
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    with applied(model, edit):  # hooks still work
        _logits(model)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (LayerEdit(40, add=torch.zeros(HIDDEN)), r"layer 40 is outside the model's 2 decoder layers \(0-1\)"),
        (LayerEdit(-1), "outside the model's 2 decoder layers"),
        (LayerEdit(0, add=torch.zeros(16)), r"add has shape \(16,\); expected \[32\]"),
        (LayerEdit(0, direction=torch.zeros(1, HIDDEN)), r"direction has shape \(1, 32\)"),
        (LayerEdit(0, add=torch.full((HIDDEN,), float("nan"))), "NaN or infinite"),
        (LayerEdit(0, direction=torch.zeros(HIDDEN)), "zero vector"),
        (LayerEdit(0, direction=_vec(1), ablate_scale=float("inf")), "ablate_scale must be a finite"),
        (LayerEdit(0, add=torch.zeros(HIDDEN, dtype=torch.long)), "floating-point tensor"),
    ],
)
def test_check_errors(entry, message):
    with pytest.raises(PrunescopeError, match=message):
        Edit([entry]).check(tiny_llama())


def test_check_refuses_a_layer_edited_twice():
    with pytest.raises(PrunescopeError, match="layer 1 is edited twice"):
        Edit([LayerEdit(1, add=_vec(0)), LayerEdit(1, direction=_vec(1))]).check(tiny_llama())


def test_direction_need_not_be_unit_length():
    model = tiny_llama()
    with applied(model, Edit([LayerEdit(1, direction=_vec(3))])):
        unit = _logits(model)
    with applied(model, Edit([LayerEdit(1, direction=7.5 * _vec(3))])):
        scaled = _logits(model)
    torch.testing.assert_close(scaled, unit, atol=1e-5, rtol=0)


def test_float32_edit_on_a_bfloat16_model():
    model = tiny_llama().to(torch.bfloat16)
    add = _vec(0)
    before = _layer_output(model, 0)
    with applied(model, Edit([LayerEdit(0, add=add, direction=_vec(1))])):
        after = _layer_output(model, 0)
    assert after.dtype == torch.bfloat16 and not torch.equal(after, before)


def test_save_and_load_round_trip(tmp_path):
    edit = _mixed_edit()
    path = save_edit(edit, tmp_path / "edit" / "edit.safetensors")
    loaded = load_edit(path)
    assert [(e.layer, e.ablate_scale) for e in loaded.layers] == [(e.layer, e.ablate_scale) for e in edit.layers]
    for a, b in zip(loaded.layers, edit.layers):
        for name in ("add", "direction"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert loaded.nbytes == edit.nbytes == 4 * 4 * HIDDEN
    assert loaded.summary() == edit.summary()


def test_load_edit_errors(tmp_path):
    with pytest.raises(PrunescopeError, match="does not exist"):
        load_edit(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PrunescopeError, match="not a prunescope edit file"):
        load_edit(junk)


def test_fold_leaves_the_hooked_copy_equal():
    """Folding one copy does not disturb another (tests above compare against the hooked model)."""
    model = tiny_llama()
    twin = copy.deepcopy(model)
    edit = Edit([LayerEdit(1, add=_vec(2))])
    folded = fold(model, edit)
    with applied(twin, edit):
        torch.testing.assert_close(_logits(folded), _logits(twin), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- new MLP units


def _units(seed: int, count: int, hidden: int = HIDDEN) -> Units:
    """Reproducible random units (gate and up rows, down columns)."""
    g = torch.Generator().manual_seed(seed)
    return Units(torch.randn(count, hidden, generator=g), torch.randn(count, hidden, generator=g),
                 torch.randn(hidden, count, generator=g))


def test_units_add_what_they_compute_to_the_mlp_output():
    """The MLP's output grows by exactly silu(x G^T) * (x U^T) D^T, x being the MLP's input."""
    model = tiny_llama(num_layers=2)
    mlp = models.adapter_for(model).layers(model)[1].mlp
    seen: dict[str, torch.Tensor] = {}

    def capture():
        return mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))

    handle = capture()
    _logits(model)
    handle.remove()
    x, before = seen["x"], seen["out"]
    units = _units(0, 3)
    with applied(model, Edit([LayerEdit(1, units=units)])):
        handle = capture()  # registered after the edit's hook: sees the edited output
        _logits(model)
    handle.remove()
    want = (torch.nn.functional.silu(x @ units.gate.T) * (x @ units.up.T)) @ units.down.T  # [B, S, hidden]
    torch.testing.assert_close(seen["out"], before + want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_units_fold_into_a_wider_mlp_and_round_trip(family, tmp_path):
    """Folding widens every layer's MLP by the most units any layer adds (zeros elsewhere); the
    reloaded plain transformers model computes what the hooked one did."""
    model = tiny_family_model(family)
    base = model.config.intermediate_size
    entries = [LayerEdit(0, units=_units(1, 3)), LayerEdit(1, units=_units(2, 1))]
    if family == "llama":  # an added vector and an ablation folded in the same rebuild
        entries += [LayerEdit(2, add=_vec(3, 0.3), direction=_vec(4))]
    edit = Edit(entries)
    with applied(model, edit):
        hooked = _logits(model)
    assert not torch.allclose(hooked, _logits(model), atol=1e-3)
    folded = fold(model, edit)
    assert folded.config.intermediate_size == base + 3
    # float32 rounding only: the units' sums run in another order inside the wider matmuls
    torch.testing.assert_close(_logits(folded), hooked, atol=1e-4, rtol=1e-5)
    folded.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-4, rtol=1e-5)
    layers = models.adapter_for(reloaded).layers(reloaded)
    assert not layers[1].mlp.down_proj.weight[:, base + 1:].any()  # layer 1 adds 1 unit: 2 zero columns
    assert not layers[2].mlp.gate_proj.weight[base:].any()  # no units in layer 2


@pytest.mark.parametrize(("family", "message"), [
    ("phi3", "separate gate and up projections"), ("opt", "not one"), ("gpt2", "not one"),
])
def test_units_refused_where_the_mlp_is_not_gated_with_separate_projections(family, message):
    model = tiny_family_model(family)
    hidden = model.config.hidden_size
    with pytest.raises(PrunescopeError, match=message):
        Edit([LayerEdit(0, units=_units(0, 2, hidden))]).check(model)
    with pytest.raises(PrunescopeError, match=message):
        new_units(model, 0, 2, torch.Generator())


@pytest.mark.parametrize(("units", "message"), [
    (Units(torch.zeros(2, HIDDEN), torch.zeros(3, HIDDEN), torch.zeros(HIDDEN, 2)),
     r"units.up has shape \(3, 32\); expected \[2, 32\]"),
    (Units(torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN)), r"units.down has shape \(2, 32\)"),
    (Units(torch.zeros(2, 16), torch.zeros(2, 16), torch.zeros(16, 2)), r"units.gate has shape \(2, 16\)"),
    (Units(torch.zeros(HIDDEN), torch.zeros(HIDDEN), torch.zeros(HIDDEN)), "2-D floating-point tensor"),
    (Units(torch.full((1, HIDDEN), float("inf")), torch.zeros(1, HIDDEN), torch.zeros(HIDDEN, 1)), "NaN or infinite"),
])
def test_units_check_errors(units, message):
    with pytest.raises(PrunescopeError, match=message):
        Edit([LayerEdit(0, units=units)]).check(tiny_llama())


def test_units_and_a_direction_in_one_layer_are_refused():
    with pytest.raises(PrunescopeError, match="units and a direction in the same layer"):
        Edit([LayerEdit(0, direction=_vec(1), units=_units(0, 1))]).check(tiny_llama())


def test_new_units_write_nothing_until_fitted():
    """A fit starts from units whose down is zero (the model unchanged) and whose gate and up rows
    have the size of the layer's own rows."""
    model = tiny_llama()
    units = new_units(model, 1, 4, torch.Generator().manual_seed(0))
    assert units.gate.shape == units.up.shape == (4, HIDDEN) and units.down.shape == (HIDDEN, 4)
    assert all(t.requires_grad for t in (units.gate, units.up, units.down)) and not units.down.any()
    own = models.adapter_for(model).layers(model)[1].mlp.gate_proj.weight
    assert 0.5 < float(units.gate.detach().std() / own.detach().std()) < 2.0
    before = _logits(model)
    with applied(model, Edit([LayerEdit(1, units=units)])):
        torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_scaled_and_detached_edits():
    units = _units(0, 2)
    edit = Edit([LayerEdit(0, add=_vec(1), units=units), LayerEdit(1, direction=_vec(2), ablate_scale=0.5)])
    half = edit.scaled(0.5)
    torch.testing.assert_close(half.layers[0].add, 0.5 * _vec(1))
    torch.testing.assert_close(half.layers[0].units.down, 0.5 * units.down)
    assert half.layers[0].units.gate is units.gate and half.layers[1].direction is edit.layers[1].direction
    copy_ = edit.detached()
    assert copy_.layers[0].units.gate is not units.gate and torch.equal(copy_.layers[0].units.gate, units.gate)


def test_units_save_and_load_round_trip(tmp_path):
    edit = Edit([LayerEdit(0, units=_units(0, 3)), LayerEdit(1, add=_vec(1))])
    loaded = load_edit(save_edit(edit, tmp_path / "edit.safetensors"))
    for name in ("gate", "up", "down"):
        assert torch.equal(getattr(loaded.layers[0].units, name), getattr(edit.layers[0].units, name))
    assert loaded.layers[1].units is None and loaded.nbytes == edit.nbytes == 4 * (9 * HIDDEN + HIDDEN)
    assert loaded.summary()[0]["units"] == 3


# --------------------------------------------------------------------------- gated vectors


def _gate(seed: int, bias: float = 0.5, span: float = 2.0) -> Gate:
    return Gate(_vec(seed), bias, span)


def test_biased_units_add_what_they_compute():
    """Units with gate and up biases add silu(x G^T + b_g) * (x U^T + b_u) D^T to the MLP output."""
    model = tiny_llama(num_layers=2)
    mlp = models.adapter_for(model).layers(model)[1].mlp
    seen: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(3)
    units = dataclasses.replace(_units(0, 3), gate_bias=torch.randn(3, generator=g), up_bias=torch.randn(3, generator=g))
    handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    _logits(model)
    handle.remove()
    before = seen["out"]
    with applied(model, Edit([LayerEdit(1, units=units)])):
        handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))  # after the edit's
        _logits(model)
    handle.remove()
    x = seen["x"]
    want = (torch.nn.functional.silu(x @ units.gate.T + units.gate_bias) * (x @ units.up.T + units.up_bias)) @ units.down.T
    torch.testing.assert_close(seen["out"], before + want, atol=1e-5, rtol=1e-5)


def test_a_gated_vector_adds_the_ramp_times_the_vector():
    """A gated vector adds g(x) add, g = (silu(u) - silu(u - span)) / span, u = w . x + b, x the
    MLP's input, computed here directly from the captured input."""
    model = tiny_llama(num_layers=2)
    mlp = models.adapter_for(model).layers(model)[1].mlp
    seen: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    _logits(model)
    handle.remove()
    before, x = seen["out"], seen["x"]
    gate, add = _gate(5), _vec(6, 0.4)
    with applied(model, Edit([LayerEdit(1, add=add, gate=gate)])):
        handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(out=out))  # after the edit's
        _logits(model)
    handle.remove()
    u = x @ gate.weight + gate.bias  # [B, S]
    silu = torch.nn.functional.silu
    ramp = (silu(u) - silu(u - gate.span)) / gate.span
    torch.testing.assert_close(seen["out"], before + ramp[..., None] * add, atol=1e-5, rtol=1e-5)


def test_a_gated_vector_moves_only_where_its_gate_opens():
    """With the gate shut everywhere (a large negative bias) the model is unchanged; gradients
    reach the vector through the gate's units."""
    model = tiny_llama(num_layers=2)
    before = _logits(model)
    add = _vec(6, 0.4).requires_grad_(True)
    with applied(model, Edit([LayerEdit(1, add=add, gate=Gate(_vec(5, 0.01), -100.0, 2.0))])):
        torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)
    with applied(model, Edit([LayerEdit(1, add=add, gate=Gate(_vec(5, 0.01), 100.0, 2.0))])):
        model(IDS).logits.sum().backward()
    assert add.grad is not None and add.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_a_gated_vector_folds_into_a_wider_mlp_with_biases(family, tmp_path):
    """Llama: two units per gated layer, gate/up biases turned on (mlp_bias), the reloaded folder
    gives the hooked logits, with a plain vector in another layer folded in the same rebuild.
    Families without MLP biases in plain transformers refuse the fold in one line."""
    model = tiny_family_model(family)
    base = model.config.intermediate_size
    edit = Edit([LayerEdit(0, add=_vec(1, 0.5), gate=_gate(2, 0.3)), LayerEdit(1, add=_vec(3, 0.3))])
    if family != "llama":
        with pytest.raises(PrunescopeError, match=r"no gate/up bias in plain transformers, so units with biases"):
            fold(model, Edit(edit.layers[:1]))
        return
    with applied(model, edit):
        hooked = _logits(model)
    assert not torch.allclose(hooked, _logits(model), atol=1e-3)
    folded = fold(model, edit)
    assert folded.config.intermediate_size == base + 2 and folded.config.mlp_bias
    torch.testing.assert_close(_logits(folded), hooked, atol=1e-4, rtol=1e-5)
    folded.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(reloaded), hooked, atol=1e-4, rtol=1e-5)
    mlp = models.adapter_for(reloaded).layers(reloaded)[0].mlp
    assert mlp.gate_proj.bias[base:].tolist() == pytest.approx([0.3, 0.3 - 2.0])
    assert not mlp.gate_proj.bias[:base].any() and not mlp.down_proj.bias.any()


def test_a_gated_vector_in_bfloat16_hooked_and_folded_stays_near_float32():
    """In bfloat16 the gate's two units read u and u - span rounded (steps of 0.125-0.5 for u in
    16-128), so g is off by up to a few hundredths where the gate is open: the bf16 edit,
    hooked or folded into the wider MLP, stays within 5% of the float32 edit's effect on the
    logits (here |w . x| reaches 60, u = w . x + 20, span 8), and the fold within bf16 rounding of
    the hooks."""
    model = tiny_llama(num_layers=2)
    mlp = models.adapter_for(model).layers(model)[0].mlp
    seen: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0]))
    _logits(model)
    handle.remove()
    w = _vec(2)
    w = w * (60.0 / float((seen["x"] @ w).abs().max()))  # |w . x| up to 60
    edit = Edit([LayerEdit(0, add=_vec(1, 0.5), gate=Gate(w, 20.0, 8.0))])
    base32 = _logits(model)
    with applied(model, edit):
        hooked32 = _logits(model)
    effect = float((hooked32 - base32).abs().max())
    half = copy.deepcopy(model).to(torch.bfloat16)
    with applied(half, edit):
        hooked16 = _logits(half).float()
    folded16 = _logits(fold(half, edit)).float()
    assert effect > 0.3
    assert float((hooked16 - hooked32).abs().max()) < 0.05 * effect
    assert float((folded16 - hooked32).abs().max()) < 0.05 * effect
    assert float((folded16 - hooked16).abs().max()) < 0.02 * effect


def test_units_with_biases_refused_in_the_fold_where_gate_and_up_have_no_bias():
    """Mistral: biased units (no vector in the layer) are refused for their gate/up biases, and a
    layer with a vector and biased units names the writer's bias first."""
    model = tiny_family_model("mistral")
    biased = dataclasses.replace(_units(0, 2), gate_bias=torch.ones(2))
    with pytest.raises(PrunescopeError, match=r"no gate/up bias .* units with biases \(a gated vector's\) \(layer 0\)"):
        fold(model, Edit([LayerEdit(0, units=biased)]))
    with pytest.raises(PrunescopeError, match=r"no mlp.down_proj bias .* an added vector \(layer 1\)"):
        fold(model, Edit([LayerEdit(1, add=_vec(1), units=biased)]))


@pytest.mark.parametrize(("entry", "message"), [
    (LayerEdit(0, gate=Gate(_vec(1), 0.0)), "a gate switches an added vector; give add as well"),
    (LayerEdit(0, add=_vec(1), gate=Gate(_vec(1), 0.0), units=_units(0, 1)), "neither units nor a direction"),
    (LayerEdit(0, add=_vec(1), gate=Gate(_vec(1), 0.0), direction=_vec(2)), "neither units nor a direction"),
    (LayerEdit(0, add=_vec(1), gate=Gate(torch.zeros(16), 0.0)), r"gate.weight has shape \(16,\)"),
    (LayerEdit(0, add=_vec(1), gate=Gate(_vec(1), float("nan"))), "gate.bias must be a finite number"),
    (LayerEdit(0, add=_vec(1), gate=Gate(_vec(1), 0.0, 0.0)), "gate.span must be a finite number > 0"),
    (LayerEdit(0, units=dataclasses.replace(_units(0, 2), gate_bias=torch.zeros(3))),
     r"units.gate_bias has shape \(3,\); expected \[2\]"),
])
def test_gate_check_errors(entry, message):
    with pytest.raises(PrunescopeError, match=message):
        Edit([entry]).check(tiny_llama())


def test_a_gated_vector_is_refused_where_the_mlp_is_not_gated():
    model = tiny_family_model("phi3")
    hidden = model.config.hidden_size
    with pytest.raises(PrunescopeError, match="a gated vector is written by two new units; new units need"):
        Edit([LayerEdit(0, add=torch.ones(hidden), gate=Gate(torch.ones(hidden), 0.0))]).check(model)


def test_gated_edits_save_load_scale_and_detach(tmp_path):
    """The gate's weight, bias and span survive saving; scaling scales the vector, not the gate."""
    edit = Edit([LayerEdit(0, add=_vec(1), gate=_gate(2, -1.5, 4.0)),
                 LayerEdit(1, units=dataclasses.replace(_units(0, 2), up_bias=torch.ones(2)))])
    loaded = load_edit(save_edit(edit, tmp_path / "edit.safetensors"))
    gate = loaded.layers[0].gate
    assert torch.equal(gate.weight, edit.layers[0].gate.weight) and (gate.bias, gate.span) == (-1.5, 4.0)
    assert torch.equal(loaded.layers[1].units.up_bias, torch.ones(2)) and loaded.layers[1].units.gate_bias is None
    assert loaded.summary()[0]["gated"] and not loaded.summary()[1]["gated"]
    assert loaded.nbytes == edit.nbytes == 4 * (2 * HIDDEN + 6 * HIDDEN + 2)  # add, gate.weight; units, up_bias
    half = edit.scaled(0.5)
    torch.testing.assert_close(half.layers[0].add, 0.5 * _vec(1))
    assert half.layers[0].gate is edit.layers[0].gate
    assert edit.detached().layers[0].gate.weight is not edit.layers[0].gate.weight


def test_an_edit_file_of_a_newer_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "edit.safetensors"
    save_file({"layer.0.add": _vec(1)}, str(path), metadata={
        "prunescope_edit": json.dumps({"format": 3, "layers": [{"layer": 0, "ablate_scale": 1.0}]})})
    with pytest.raises(PrunescopeError, match="format 3, newer than this prunescope reads"):
        load_edit(path)
