"""prunescope.prune against torch.nn.utils.prune itself, property-based.

Every example builds one small module, prunes a copy with torch and a copy with prunescope by
the same sequence of calls, and checks masks, pruned weights, forward outputs, gradients,
state dicts loaded both ways and ``remove``. Weights have distinct magnitudes (tie-free), so the
deterministic methods must agree exactly; the random ones use the same seed and the same draws.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.utils.prune as tp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunescope.prune as pp

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def distinct_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random signs times distinct magnitudes in random order: tie-free |values|."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).double() + 1 + torch.rand(n, generator=g, dtype=torch.float64) * 0.5) / n
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (mags * signs).float().view(shape)


def make_module(kind: str, a: int, b: int, seed: int) -> nn.Module:
    """A Linear(a -> b) or Conv2d(a -> b, kernel 2) with tie-free weights and bias."""
    m = nn.Linear(a, b) if kind == "linear" else nn.Conv2d(a, b, 2)
    with torch.no_grad():
        m.weight.copy_(distinct_values(tuple(m.weight.shape), seed))
        m.bias.copy_(distinct_values(tuple(m.bias.shape), seed + 1))
    return m


def module_input(m: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(m, nn.Linear):
        return torch.randn(3, m.in_features, generator=g)
    return torch.randn(2, m.in_channels, 4, 4, generator=g)


@st.composite
def amounts(draw) -> tuple[str, float]:
    """A fraction, or a count given as a fraction of what is left (resolved at call time)."""
    kind = draw(st.sampled_from(["fraction", "count"]))
    return kind, draw(st.floats(0.0, 1.0))


def resolve(amount: tuple[str, float], n_left: int) -> int | float:
    kind, f = amount
    return f if kind == "fraction" else int(math.floor(f * n_left))


op_strategy = st.one_of(
    st.tuples(st.just("l1"), amounts(), st.booleans()),
    st.tuples(st.just("ln"), amounts(), st.sampled_from([1, 2, 3, math.inf, -math.inf]), st.booleans(), st.integers(-4, 3)),
    st.tuples(st.just("identity")),
    st.tuples(st.just("custom"), st.integers(0, 10_000)),
    st.tuples(st.just("random_u"), amounts()),
    st.tuples(st.just("random_s"), amounts(), st.integers(-4, 3)),
)


def current_mask(m: nn.Module, name: str) -> torch.Tensor:
    mask = getattr(m, name + "_mask", None)
    return torch.ones_like(getattr(m, name), dtype=torch.bool) if mask is None else mask.bool()


def run_op(op: tuple, t_mod: nn.Module, p_mod: nn.Module, name: str, seed: int) -> None:
    """Apply one pruning call to both modules (same arguments, same RNG state)."""
    t = getattr(t_mod, name)
    mask = current_mask(t_mod, name)
    kind = op[0]
    if kind in ("ln", "random_s"):
        dim = op[-1] if -t.dim() <= op[-1] < t.dim() else op[-1] % t.dim()  # negative dims too
        others = [d for d in range(t.dim()) if d != dim % t.dim()]
        channels_left = int(mask.any(dim=others).sum())
        amount = resolve(op[1], channels_left)
    elif kind in ("l1", "random_u"):
        amount = resolve(op[1], int(mask.sum()))
    if kind == "l1":
        scores = distinct_values(tuple(t.shape), seed + 7) if op[2] else None
        tp.l1_unstructured(t_mod, name, amount, importance_scores=scores)
        pp.l1_unstructured(p_mod, name, amount, importance_scores=scores)
    elif kind == "ln":
        n = op[2]
        if n == -math.inf and not bool(mask.all()):
            n = 1  # min |w| of a partly pruned channel is 0 for several channels: ties
        scores = distinct_values(tuple(t.shape), seed + 5) if op[3] else None
        tp.ln_structured(t_mod, name, amount, n=n, dim=dim, importance_scores=scores)
        pp.ln_structured(p_mod, name, amount, n=n, dim=dim, importance_scores=scores)
    elif kind == "identity":
        tp.identity(t_mod, name)
        pp.identity(p_mod, name)
    elif kind == "custom":
        g = torch.Generator().manual_seed(op[1])
        custom = (torch.rand(t.shape, generator=g) > 0.3).float()
        tp.custom_from_mask(t_mod, name, custom)
        pp.custom_from_mask(p_mod, name, custom)
    elif kind == "random_u":
        torch.manual_seed(seed)
        tp.random_unstructured(t_mod, name, amount)
        torch.manual_seed(seed)
        pp.random_unstructured(p_mod, name, amount)
    elif kind == "random_s":
        torch.manual_seed(seed)
        tp.random_structured(t_mod, name, amount, dim)
        torch.manual_seed(seed)
        pp.random_structured(p_mod, name, amount, dim)


def assert_same_pruning(t_mod: nn.Module, p_mod: nn.Module, names: list[str]) -> None:
    for name in names:
        t_mask, p_mask = getattr(t_mod, name + "_mask"), getattr(p_mod, name + "_mask")
        assert p_mask.dtype == torch.bool
        assert torch.equal(t_mask.bool(), p_mask), name
        assert torch.equal(t_mask, p_mask.to(t_mask.dtype)), name  # torch's mask is 0/1 exactly
        assert torch.equal(getattr(t_mod, name), getattr(p_mod, name)), name
        # torch keeps old values under its mask; ours are zero there, equal where kept
        assert torch.equal(getattr(t_mod, name + "_orig") * t_mask, getattr(p_mod, name + "_orig"))
    assert pp.is_pruned(p_mod) and tp.is_pruned(t_mod)


def assert_same_forward_and_grad(t_mod: nn.Module, p_mod: nn.Module, names: list[str], seed: int) -> None:
    x = module_input(t_mod, seed)
    y_t, y_p = t_mod(x), p_mod(x)
    assert torch.equal(y_t, y_p)
    y_t.square().sum().backward()
    y_p.square().sum().backward()
    for name in names:
        assert torch.equal(getattr(t_mod, name + "_orig").grad, getattr(p_mod, name + "_orig").grad), name


def assert_state_dicts_cross_load(t_mod: nn.Module, p_mod: nn.Module, names: list[str], fresh) -> None:
    x = module_input(t_mod, 0)
    with torch.no_grad():
        ref = t_mod(x)
        mine = fresh()  # prunescope-pruned module, loads torch's state dict
        for name in names:
            pp.identity(mine, name)
        mine.load_state_dict(t_mod.state_dict())
        assert torch.equal(mine(x), ref)
        theirs = fresh()  # torch-pruned module, loads ours
        for name in names:
            tp.identity(theirs, name)
        theirs.load_state_dict(p_mod.state_dict())
        assert torch.equal(theirs(x), ref)
        for name in names:
            assert torch.equal(getattr(mine, name), getattr(t_mod, name))
            assert torch.equal(getattr(theirs, name), getattr(t_mod, name))
            assert getattr(mine, name + "_mask").dtype == torch.bool


def assert_same_remove(t_mod: nn.Module, p_mod: nn.Module, names: list[str]) -> None:
    for name in names:
        tp.remove(t_mod, name)
        pp.remove(p_mod, name)
    assert not pp.is_pruned(p_mod)
    t_sd, p_sd = t_mod.state_dict(), p_mod.state_dict()
    assert list(t_sd) == list(p_sd)
    for key in t_sd:
        assert torch.equal(t_sd[key], p_sd[key]), key
    assert isinstance(p_mod.weight, nn.Parameter)


@SETTINGS
@given(
    kind=st.sampled_from(["linear", "conv"]),
    a=st.integers(1, 6),
    b=st.integers(2, 7),
    names=st.sampled_from([["weight"], ["bias"], ["weight", "bias"]]),
    ops=st.lists(op_strategy, min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_single_and_iterative_pruning_match_torch(kind, a, b, names, ops, seed) -> None:
    base = make_module(kind, a, b, seed)
    t_mod, p_mod = copy.deepcopy(base), copy.deepcopy(base)
    for i, op in enumerate(ops):
        for name in names:
            if op[0] in ("ln", "random_s") and getattr(base, name).dim() < 2:
                op = ("l1", op[1], False)  # channels need a 2-D+ tensor; prune entries instead
            run_op(op, t_mod, p_mod, name, seed + i)
    assert_same_pruning(t_mod, p_mod, names)
    assert_same_forward_and_grad(t_mod, p_mod, names, seed)
    assert_state_dicts_cross_load(t_mod, p_mod, names, lambda: make_module(kind, a, b, seed + 99))
    assert_same_remove(t_mod, p_mod, names)


@SETTINGS
@given(
    sizes=st.lists(st.tuples(st.sampled_from(["linear", "conv"]), st.integers(1, 5), st.integers(1, 6)), min_size=1, max_size=4),
    with_bias=st.booleans(),
    amount=amounts(),
    second=st.one_of(st.none(), amounts()),
    pre_prune=st.booleans(),
    use_scores=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_global_unstructured_matches_torch(sizes, with_bias, amount, second, pre_prune, use_scores, seed) -> None:
    base = nn.ModuleList(make_module(k, a, b, seed + 10 * i) for i, (k, a, b) in enumerate(sizes))
    t_net, p_net = copy.deepcopy(base), copy.deepcopy(base)

    def pairs(net):
        out = [(m, "weight") for m in net]
        return out + [(m, "bias") for m in net] if with_bias else out

    if pre_prune:  # one parameter already pruned on its own: global pruning respects its mask
        tp.l1_unstructured(t_net[0], "weight", 0.5)
        pp.l1_unstructured(p_net[0], "weight", 0.5)
    for step, amt in enumerate([amount] if second is None else [amount, second]):
        n_left = sum(int(current_mask(m, n).sum()) for m, n in pairs(t_net))
        value = resolve(amt, n_left)
        scores_t = scores_p = None
        if use_scores:
            vals = [distinct_values(tuple(getattr(m, n).shape), seed + 100 * step + i) for i, (m, n) in enumerate(pairs(t_net))]
            scores_t = {key: v for key, v in zip(pairs(t_net), vals)}
            scores_p = {key: v for key, v in zip(pairs(p_net), vals)}
        tp.global_unstructured(pairs(t_net), tp.L1Unstructured, importance_scores=scores_t, amount=value)
        pp.global_unstructured(pairs(p_net), pp.L1Unstructured, importance_scores=scores_p, amount=value)
    names = ["weight", "bias"] if with_bias else ["weight"]
    for t_mod, p_mod in zip(t_net, p_net):
        assert_same_pruning(t_mod, p_mod, names)
        assert_same_forward_and_grad(t_mod, p_mod, names, seed)
        assert_same_remove(t_mod, p_mod, names)


@settings(max_examples=15, deadline=None)
@given(amount=amounts(), seed=st.integers(0, 2**16))
def test_global_random_unstructured_draws_like_torch(amount, seed) -> None:
    base = nn.ModuleList([make_module("linear", 4, 3, seed), make_module("conv", 2, 3, seed + 1)])
    t_net, p_net = copy.deepcopy(base), copy.deepcopy(base)
    value = resolve(amount, sum(m.weight.numel() for m in base))
    torch.manual_seed(seed)
    tp.global_unstructured([(m, "weight") for m in t_net], tp.RandomUnstructured, amount=value)
    torch.manual_seed(seed)
    pp.global_unstructured([(m, "weight") for m in p_net], pp.RandomUnstructured, amount=value)
    for t_mod, p_mod in zip(t_net, p_net):
        assert_same_pruning(t_mod, p_mod, ["weight"])


def test_training_steps_match_torch() -> None:
    """SGD with momentum and weight decay: outputs and weights stay identical step after step.

    Exercises the lazy re-zeroing: each step changes ``weight_orig`` in place, and the next
    forward must see the pruned weight exactly as torch's ``orig * mask``.
    """
    base = make_module("linear", 6, 5, 3)
    t_mod, p_mod = copy.deepcopy(base), copy.deepcopy(base)
    tp.l1_unstructured(t_mod, "weight", 0.5)
    pp.l1_unstructured(p_mod, "weight", 0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for m in (t_mod, p_mod)]
    for step in range(5):
        x = module_input(t_mod, step)
        outs = []
        for m, opt in zip((t_mod, p_mod), opts):
            opt.zero_grad()
            y = m(x)
            y.square().sum().backward()
            opt.step()
            outs.append(y)
        assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        x = module_input(t_mod, 9)
        assert torch.equal(t_mod(x), p_mod(x))
        assert torch.equal(t_mod.weight, p_mod.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_match_torch(dtype) -> None:
    base = make_module("linear", 7, 6, 5).to(dtype)
    t_mod, p_mod = copy.deepcopy(base), copy.deepcopy(base)
    tp.l1_unstructured(t_mod, "weight", 0.4)
    pp.l1_unstructured(p_mod, "weight", 0.4)
    tp.ln_structured(t_mod, "weight", 1, n=2, dim=0)
    pp.ln_structured(p_mod, "weight", 1, n=2, dim=0)
    assert torch.equal(t_mod.weight_mask.bool(), p_mod.weight_mask)
    assert torch.equal(t_mod.weight, p_mod.weight)


def test_prune_and_apply_mask_match_torch() -> None:
    t = distinct_values((5, 4), 11)
    default = (torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    for ours, theirs in [
        (pp.L1Unstructured(0.5), tp.L1Unstructured(0.5)),
        (pp.LnStructured(2, n=1, dim=1), tp.LnStructured(2, n=1, dim=1)),
        (pp.CustomFromMask(default), tp.CustomFromMask(default)),
    ]:
        assert torch.equal(ours.prune(t), theirs.prune(t))
        assert torch.equal(ours.prune(t, default_mask=default), theirs.prune(t, default_mask=default))
    m_t, m_p = make_module("linear", 4, 5, 1), make_module("linear", 4, 5, 1)
    hook_t = tp.L1Unstructured.apply(m_t, "weight", 0.5)
    hook_p = pp.L1Unstructured.apply(m_p, "weight", 0.5)
    assert torch.equal(hook_t.apply_mask(m_t), hook_p.apply_mask(m_p))
