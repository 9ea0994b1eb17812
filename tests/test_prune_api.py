"""prunescope.prune: public names, light storage, lazy re-zeroing, bad input, the bundled model."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.utils.prune as tp
from torch import nn

import prunescope.prune as pp
from prunescope.errors import PrunescopeError


def linear(seed: int = 0, a: int = 8, b: int = 6) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(a, b)


def snapshot(m: nn.Module) -> dict:
    """Everything pruning may change: tensors (values, identity), hooks, attributes."""
    return {
        "params": {k: (id(v), v.detach().clone()) for k, v in m._parameters.items()},
        "buffers": {k: (id(v), v.clone()) for k, v in m._buffers.items()},
        "pre_hooks": [(k, id(h), len(h) if isinstance(h, pp.PruningContainer) else None) for k, h in m._forward_pre_hooks.items()],
        "load_hooks": (list(m._load_state_dict_pre_hooks), list(m._load_state_dict_post_hooks)),
        "dict_tensors": {k: id(v) for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)},
    }


def assert_unchanged(before: dict, m: nn.Module) -> None:
    after = snapshot(m)
    assert before["pre_hooks"] == after["pre_hooks"]
    assert before["load_hooks"] == after["load_hooks"]
    assert before["dict_tensors"] == after["dict_tensors"]
    for kind in ("params", "buffers"):
        assert before[kind].keys() == after[kind].keys()
        for k, (ident, value) in before[kind].items():
            assert after[kind][k][0] == ident
            assert torch.equal(after[kind][k][1], value)


def test_same_public_names_as_torch() -> None:
    names = [
        "BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured", "L1Unstructured",
        "RandomStructured", "LnStructured", "CustomFromMask", "identity", "random_unstructured",
        "l1_unstructured", "random_structured", "ln_structured", "global_unstructured",
        "custom_from_mask", "remove", "is_pruned",
    ]
    for name in names:
        assert hasattr(tp, name) and hasattr(pp, name), name
    assert set(pp.__all__) == set(names)


def test_light_storage_bool_mask_and_shared_weight() -> None:
    m = linear()
    dense_bytes = m.weight.numel() * m.weight.element_size()
    pp.l1_unstructured(m, "weight", 0.5)
    assert m.weight_mask.dtype == torch.bool
    assert m.weight.data_ptr() == m.weight_orig.data_ptr()  # a view, not a product copy
    assert int((m.weight_orig == 0).sum()) == 24  # pruned entries zeroed in place
    assert list(m.state_dict()) == ["bias", "weight_orig", "weight_mask"]  # torch's keys
    buf = io.BytesIO()
    torch.save({k: v for k, v in m.state_dict().items() if k.startswith("weight")}, buf)
    stored = m.weight_orig.numel() * 4 + m.weight_mask.numel()
    assert stored == 1.25 * dense_bytes
    t = linear()
    tp.l1_unstructured(t, "weight", 0.5)
    torch_bytes = sum(x.numel() * x.element_size() for x in (t.weight_orig, t.weight_mask, t.weight))
    assert torch_bytes == 3 * dense_bytes


def test_forward_re_zeroes_only_after_a_change() -> None:
    m = linear()
    pp.l1_unstructured(m, "weight", 0.5)
    x = torch.randn(2, 8)
    with torch.no_grad():
        m(x)
        version = m.weight_orig._version
        m(x)
        m(x)
        assert m.weight_orig._version == version  # nothing to redo: no write
        m.weight_orig.add_(1.0)  # like an optimizer step: pruned entries become non-zero
        y = m(x)
    expected = torch.nn.functional.linear(x, (m.weight_orig * m.weight_mask), m.bias)
    assert torch.equal(y, expected)
    assert bool((m.weight_orig[~m.weight_mask] == 0).all())


def test_load_torch_state_dict_re_zeroes_before_any_forward() -> None:
    t, m = linear(1), linear(1)
    tp.l1_unstructured(t, "weight", 0.5)
    pp.identity(m, "weight")
    m.load_state_dict(t.state_dict())
    assert bool((t.weight_orig != 0).all())  # torch keeps old values under its mask
    assert torch.equal(m.weight, t.weight)  # ours: already pruned, no forward needed
    assert m.weight_mask.dtype == torch.bool


def test_deepcopy_and_pickle_before_forward() -> None:
    m = linear()
    pp.ln_structured(m, "weight", 2, n=1, dim=0)
    c = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 8)
    for other in (c, loaded):
        assert torch.equal(other(x), m(x))
        assert pp.is_pruned(other)
        pp.remove(other, "weight")
        assert not pp.is_pruned(other)


def test_iterative_container_and_custom_method() -> None:
    class EveryOther(pp.BasePruningMethod):
        """A user method: prune every other still-unpruned entry (gets a bool default mask)."""

        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            mask = default_mask.clone()
            mask.view(-1)[::2] = False
            return mask

    m = linear()
    pp.l1_unstructured(m, "weight", 0.25)  # 12 of 48
    EveryOther.apply(m, "weight")  # 18 of the 36 left
    hook = next(iter(m._forward_pre_hooks.values()))
    assert isinstance(hook, pp.PruningContainer) and len(hook) == 2
    assert isinstance(hook[1], EveryOther)
    assert int((~m.weight_mask).sum()) == 12 + 18
    pp.random_structured(m, "weight", 1, dim=0)
    assert len(hook) == 3 and next(iter(m._forward_pre_hooks.values())) is hook
    assert int((~m.weight_mask).all(dim=1).sum()) >= 1


def test_is_pruned_sees_torch_hooks_and_refuses_to_mix() -> None:
    m = nn.Sequential(linear(), nn.ReLU())
    assert not pp.is_pruned(m)
    tp.l1_unstructured(m[0], "weight", 0.5)
    assert pp.is_pruned(m)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        pp.l1_unstructured(m[0], "weight", 0.5)


BAD_CALLS = {
    "amount < 0": lambda m: pp.l1_unstructured(m, "weight", -0.1),
    "amount > 1": lambda m: pp.random_unstructured(m, "weight", 1.5),
    "count > entries": lambda m: pp.l1_unstructured(m, "weight", 49),
    "count > channels": lambda m: pp.ln_structured(m, "weight", 7, n=2, dim=0),
    "amount NaN": lambda m: pp.l1_unstructured(m, "weight", math.nan),
    "amount str": lambda m: pp.l1_unstructured(m, "weight", "half"),
    "missing name": lambda m: pp.l1_unstructured(m, "weights", 0.5),
    "scores shape": lambda m: pp.l1_unstructured(m, "weight", 0.5, importance_scores=torch.ones(6, 7)),
    "scores dtype": lambda m: pp.l1_unstructured(m, "weight", 0.5, importance_scores=torch.ones(6, 8, dtype=torch.bool)),
    "dim out of range": lambda m: pp.ln_structured(m, "weight", 0.5, n=2, dim=2),
    "dim on 1-D": lambda m: pp.random_structured(m, "bias", 0.5, dim=0),
    "unknown n": lambda m: pp.ln_structured(m, "weight", 0.5, n="l2", dim=0),
    "mask shape": lambda m: pp.custom_from_mask(m, "weight", torch.ones(8, 6)),
    "mask values": lambda m: pp.custom_from_mask(m, "weight", torch.full((6, 8), 0.5)),
    "global count": lambda m: pp.global_unstructured([(m, "weight"), (m, "bias")], pp.L1Unstructured, amount=60),
    "global scores": lambda m: pp.global_unstructured(
        [(m, "weight")], pp.L1Unstructured, importance_scores={(m, "weight"): torch.ones(3)}, amount=0.5
    ),
    "global structured": lambda m: pp.global_unstructured([(m, "weight")], pp.LnStructured, amount=1, n=1, dim=0),
    "global duplicate": lambda m: pp.global_unstructured([(m, "weight"), (m, "weight")], pp.L1Unstructured, amount=0.5),
    "remove unpruned": lambda m: pp.remove(m, "bias"),
}


@pytest.mark.parametrize("pre_pruned", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_and_leaves_module_unchanged(case: str, pre_pruned: bool) -> None:
    m = linear()
    if pre_pruned:
        pp.l1_unstructured(m, "weight", 0.25)
        with torch.no_grad():
            m(torch.randn(1, 8))
    before = snapshot(m)
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[case](m)
    message = str(info.value)
    assert "Linear" in message  # names the module
    if case not in ("missing name", "remove unpruned"):
        assert "(6, 8)" in message or "(6,)" in message  # and the tensor's shape
    assert_unchanged(before, m)


def test_error_types() -> None:
    m = linear()
    with pytest.raises(TypeError):
        pp.l1_unstructured(m, "weight", "half")
    with pytest.raises(IndexError):  # also a ValueError; torch callers catch IndexError
        pp.ln_structured(m, "weight", 0.5, n=2, dim=-3)
    m.register_parameter("steps", nn.Parameter(torch.ones(3, dtype=torch.long), requires_grad=False))
    with pytest.raises(TypeError, match="'steps' of shape \\(3,\\) has dtype torch.int64"):
        pp.identity(m, "steps")
    with pytest.raises(PrunescopeError):
        pp.ln_structured(m, "weight", 0.5, n=float("nan"), dim=0)


@pytest.mark.integration
def test_bundled_model_global_magnitude(bundled) -> None:
    """Half of SmolLM2-135M's 210 Linear weights pruned globally: exact count, light, and runs."""
    model, tokenizer = bundled
    model = copy.deepcopy(model)
    pairs = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(pairs) == 210
    total = sum(m.weight.numel() for m, _ in pairs)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pp.global_unstructured(pairs, pp.L1Unstructured, amount=0.5)
    pruned = sum(int((~m.weight_mask).sum()) for m, _ in pairs)
    assert pruned == round(0.5 * total)
    held = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    assert sum(held.values()) <= 1.3 * dense_bytes
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
