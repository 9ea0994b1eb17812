"""What structured pruning needs to know about each model family, and nothing else.

A decoder layer holds three kinds of removable *units*:

- ``mlp``: intermediate channels (a row of gate/up or fc1, a column of down or fc2);
- ``q``: query heads (``head_dim`` rows of q, ``head_dim`` columns of o);
- ``kv``: key/value heads (``head_dim`` rows of k and of v); with GQA, query head ``h`` reads
  key/value head ``h // (heads / kv_heads)``, so a KV *group* is one kv head and its query heads.

A :class:`UnitLayout` says where a kind of unit lives: a list of :class:`Cut` (a run of units on
the output or input side of one projection, fused projections giving several cuts) and the
*writer*, the projection whose input is the units' activations (down_proj, o_proj). Everything
else in the pruning code is family-free: scores, selection, compensation and removal work on cuts.

A :class:`Family` adds the config keys to rewrite and which bias flags exist, because a shrunk
model must load in plain ``transformers``: OPT and GPT-2 tie head size to the hidden size
(``head_dim = hidden / heads``), so fewer heads cannot be expressed in their configs and head
removal is refused for them; Mistral, Qwen2 and Phi-3 build down_proj and o_proj without a bias,
so bias compensation cannot be saved for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunescope.errors import PrunescopeError

MLP, Q, KV = "mlp", "q", "kv"


@dataclass(frozen=True)
class Cut:
    """A run of units on one side of a projection inside a decoder layer.

    Attributes:
        module: path of the projection relative to the decoder layer, e.g. ``mlp.gate_up_proj``.
        side: ``"out"`` (output features: rows of a Linear weight, and its bias) or ``"in"``
            (input features: columns of a Linear weight).
        offset: index of the first feature of the run on that side (fused projections).
    """

    module: str
    side: str
    offset: int = 0


@dataclass(frozen=True)
class UnitLayout:
    """Where the units of one kind live in a decoder layer.

    Attributes:
        kind: ``mlp``, ``q`` or ``kv``.
        count: units per layer (intermediate size, heads, kv heads).
        width: features per unit (1 for channels, ``head_dim`` for heads).
        cuts: every run of features that belongs to these units.
        writer: the projection reading the units' activations (None for ``kv``).
    """

    kind: str
    count: int
    width: int
    cuts: tuple[Cut, ...]
    writer: str | None


@dataclass(frozen=True)
class Family:
    """One model family: config keys, unit layouts and the bias flags its config offers.

    Attributes:
        name: shown in messages.
        model_types: ``config.model_type`` values handled.
        layers_key / intermediate_key: config keys of the layer count and the MLP width.
        layouts: ``config -> {kind: UnitLayout}``; no ``q``/``kv`` entries where heads cannot
            be removed.
        no_heads_reason: why heads cannot be removed (None where they can).
        no_drop_reason: ``config ->`` why layers cannot be dropped from this model (a layer's
            computation that depends on its index), or None.
        bias_flags: writer kind -> the config flag that gives the writer a bias (also giving
            every sibling projection a zero bias); ``True`` where the bias always exists,
            ``None`` where the family offers none.
    """

    name: str
    model_types: tuple[str, ...]
    layers_key: str
    intermediate_key: str
    layouts: Callable[[Any], dict[str, UnitLayout]]
    no_heads_reason: str | None = None
    bias_flags: tuple[tuple[str, str | bool | None], ...] = ((MLP, None), (Q, None))
    no_drop_reason: Callable[[Any], str | None] = lambda config: None

    def bias_flag(self, kind: str) -> str | bool | None:
        """The config flag giving the ``kind`` writer a bias, True if always there, None if never."""
        return dict(self.bias_flags)[kind]


def _heads(config: Any) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of a Llama-style config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _llama_layouts(config: Any) -> dict[str, UnitLayout]:
    """Separate q/k/v/o and gate/up/down projections (Llama, Mistral, Qwen2, Qwen3)."""
    heads, kv, head_dim = _heads(config)
    return {
        MLP: UnitLayout(MLP, config.intermediate_size, 1, (
            Cut("mlp.gate_proj", "out"), Cut("mlp.up_proj", "out"), Cut("mlp.down_proj", "in"),
        ), "mlp.down_proj"),
        Q: UnitLayout(Q, heads, head_dim, (
            Cut("self_attn.q_proj", "out"), Cut("self_attn.o_proj", "in"),
        ), "self_attn.o_proj"),
        KV: UnitLayout(KV, kv, head_dim, (
            Cut("self_attn.k_proj", "out"), Cut("self_attn.v_proj", "out"),
        ), None),
    }


def _phi3_layouts(config: Any) -> dict[str, UnitLayout]:
    """Fused ``qkv_proj`` (rows: q heads, then k, then v) and ``gate_up_proj`` (gate, then up)."""
    heads, kv, head_dim = _heads(config)
    inter = config.intermediate_size
    return {
        MLP: UnitLayout(MLP, inter, 1, (
            Cut("mlp.gate_up_proj", "out", 0), Cut("mlp.gate_up_proj", "out", inter),
            Cut("mlp.down_proj", "in"),
        ), "mlp.down_proj"),
        Q: UnitLayout(Q, heads, head_dim, (
            Cut("self_attn.qkv_proj", "out", 0), Cut("self_attn.o_proj", "in"),
        ), "self_attn.o_proj"),
        KV: UnitLayout(KV, kv, head_dim, (
            Cut("self_attn.qkv_proj", "out", heads * head_dim),
            Cut("self_attn.qkv_proj", "out", (heads + kv) * head_dim),
        ), None),
    }


def _opt_layouts(config: Any) -> dict[str, UnitLayout]:
    return {MLP: UnitLayout(MLP, config.ffn_dim, 1, (Cut("fc1", "out"), Cut("fc2", "in")), "fc2")}


def _gpt2_layouts(config: Any) -> dict[str, UnitLayout]:
    inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
    return {MLP: UnitLayout(MLP, inner, 1, (Cut("mlp.c_fc", "out"), Cut("mlp.c_proj", "in")), "mlp.c_proj")}


def _gpt2_no_drop(config: Any) -> str | None:
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return ("this GPT-2 scales attention by 1 / (layer index + 1) "
                "(scale_attn_by_inverse_layer_idx), so renumbered layers would compute something "
                "else; shrink its MLP (--mlp) only")
    return None


_FIXED_HEAD_DIM = (
    "{name}'s config has no head_dim (it is hidden_size / num_attention_heads), so plain "
    "transformers cannot load a {name} with fewer heads; shrink its MLP (--mlp) and layers "
    "(--drop-layers) instead"
)

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "num_hidden_layers", "intermediate_size", _llama_layouts,
           bias_flags=((MLP, "mlp_bias"), (Q, "attention_bias"))),
    Family("Mistral", ("mistral",), "num_hidden_layers", "intermediate_size", _llama_layouts),
    Family("Qwen2", ("qwen2",), "num_hidden_layers", "intermediate_size", _llama_layouts),
    Family("Qwen3", ("qwen3",), "num_hidden_layers", "intermediate_size", _llama_layouts,
           bias_flags=((MLP, None), (Q, "attention_bias"))),
    Family("Phi-3", ("phi3",), "num_hidden_layers", "intermediate_size", _phi3_layouts),
    Family("OPT", ("opt",), "num_hidden_layers", "ffn_dim", _opt_layouts,
           no_heads_reason=_FIXED_HEAD_DIM.format(name="OPT"),
           bias_flags=((MLP, "enable_bias"), (Q, "enable_bias"))),
    Family("GPT-2", ("gpt2",), "n_layer", "n_inner", _gpt2_layouts,
           no_heads_reason=_FIXED_HEAD_DIM.format(name="GPT-2"),
           bias_flags=((MLP, True), (Q, True)), no_drop_reason=_gpt2_no_drop),
)


def family_for(model: nn.Module, purpose: str = "structured pruning") -> Family:
    """The :class:`Family` of ``model`` (by ``config.model_type``); one clear error (naming what
    needed the layout, ``purpose``) otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise PrunescopeError(
        f"{purpose} does not support model type {model_type!r} "
        f"({type(model).__name__}); supported families: {names}"
    )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear whose weight is stored as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_matrix(module: nn.Module) -> Any:
    """The module's weight as ``[out, in]`` (a view: Conv1D stores it transposed)."""
    return module.weight.T if is_conv1d(module) else module.weight


def weight_dim(module: nn.Module, side: str) -> int:
    """The dimension of ``module.weight`` that indexes ``side`` ("out" or "in") features."""
    out_dim = 1 if is_conv1d(module) else 0
    return out_dim if side == "out" else 1 - out_dim


# Config entries holding one value per decoder layer (trimmed when layers are dropped).
PER_LAYER_KEYS = ("layer_types",)


@dataclass(frozen=True)
class Shape:
    """The per-layer sizes of a (shrunk) model: MLP width, query heads, kv heads."""

    intermediate: int
    heads: int | None = None
    kv_heads: int | None = None


def shape_of(family: Family, config: Any) -> Shape:
    """The current per-layer sizes from ``config``."""
    layouts = family.layouts(config)
    heads = layouts.get(Q)
    return Shape(
        layouts[MLP].count,
        heads.count if heads else None,
        layouts[KV].count if heads else None,
    )


def shrunk_config(
    family: Family,
    config: Any,
    shape: Shape,
    kept_layers: list[int],
    bias_flags: tuple[str, ...] = (),
) -> Any:
    """A copy of ``config`` describing the shrunk model, as plain transformers will read it.

    Sets the MLP width, the head counts with an explicit ``head_dim`` (it no longer equals
    ``hidden / heads``), the layer count, trims the per-layer lists (:data:`PER_LAYER_KEYS`) to
    the kept layers, and turns on ``bias_flags``. The copy is rebuilt from its dict, so a config
    that its own class would reject fails here, before any weight is touched.
    """
    old_layers = getattr(config, family.layers_key)
    values = config.to_dict()
    values[family.intermediate_key] = shape.intermediate
    if shape.heads is not None:
        _, _, head_dim = _heads(config)
        values.update(num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=head_dim)
    values[family.layers_key] = len(kept_layers)
    for key in PER_LAYER_KEYS:
        value = values.get(key)
        if isinstance(value, (list, tuple)) and len(value) == old_layers:
            values[key] = [value[i] for i in kept_layers]
    for flag in bias_flags:
        values[flag] = True
    try:
        new = type(config).from_dict(values)
    except (ValueError, TypeError, KeyError) as exc:
        raise PrunescopeError(
            f"{family.name}'s config class rejects the shrunk sizes {shape} with "
            f"{len(kept_layers)} layers: {exc}"
        ) from exc
    # Not part of the dict: without it, layers built from the copy fall back to eager attention,
    # which (unlike sdpa) is not causal when called with no mask, as the calibration loop does.
    new._attn_implementation = config._attn_implementation
    return new
