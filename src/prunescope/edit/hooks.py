"""The one mechanism that edits hidden outputs, and folding an edit into ordinary weights.

An :class:`Edit` acts, per decoder layer, on the two modules that write into the residual stream:
the attention writer (``o_proj``) and the MLP writer (``down_proj``), located through
:mod:`prunescope.families`. Per layer it may

- add a vector ``a`` to the MLP writer's output at every position (steering, fitted vectors);
- project a direction ``d`` out of both writers' outputs (ablation):
  ``P(x) = x - s (x . d) d / (d . d)``, ``s = 1`` being the full orthogonal projection;
- add new units to a gated MLP (:class:`Units`): unit ``j`` reads the MLP's input ``x`` and
  writes ``act(gate_j . x) (up_j . x) down_j``, a change of the residual stream that depends on
  the hidden state (on the table's cells, not on unrelated text, if the fit finds such units);
- add a vector switched by a :class:`Gate` that reads the MLP's input (``g(x) a``, ``g`` about 0
  or 1), written by two such units, so it folds like them.

:func:`applied` does this with forward hooks (used while fitting and measuring: gradients reach
the edit's tensors); :func:`fold` writes the same function into the weights, so that the model
saved with ``save_pretrained`` loads in plain ``transformers`` and computes what the hooked model
did: for a writer ``y = x W^T + b``, ``W <- P W`` and ``b <- P b + a``. Where the MLP writer has
no bias, the family's config flag (Llama's ``mlp_bias``) is turned on and the model rebuilt with
zero biases everywhere else, as structured pruning does for bias compensation. New units widen
every layer's MLP by the most units any layer adds (the mirror image of structured pruning,
which narrows it): their rows of gate/up and columns of down, zeros in the layers without them,
which then compute exactly what they did (``act(0) * 0 = 0``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import families, models
from prunescope.errors import PrunescopeError
from prunescope.families import MLP, Family, Q
from prunescope.pruning import apply

log = logging.getLogger(__name__)

_METADATA_KEY = "prunescope_edit"
_FORMAT = 2  # 2: gates and unit biases (a reader of format 1 would apply a gated vector everywhere)


@dataclass
class Units:
    """``k`` new units of a gated MLP (Llama's ``down(act(gate x) * up x)``): unit ``j`` computes
    ``act(gate[j] . x + gate_bias[j]) * (up[j] . x + up_bias[j])`` from the MLP's input ``x`` and
    writes it along ``down[:, j]``.

    Attributes:
        gate: ``[k, hidden]`` rows appended to the gate projection.
        up: ``[k, hidden]`` rows appended to the up projection.
        down: ``[hidden, k]`` columns appended to the down projection (the MLP writer).
        gate_bias: ``[k]`` biases of the new gate rows, or None (zero); folding them needs the
            family's MLP bias flag (Llama's ``mlp_bias``).
        up_bias: ``[k]`` biases of the new up rows, or None (zero).
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.gate.shape[0])

    @property
    def biased(self) -> bool:
        """Whether the units carry gate or up biases (folding then needs the MLP's bias flag)."""
        return self.gate_bias is not None or self.up_bias is not None

    def named(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, by field name (``gate``, ``up``, ``down``, ``gate_bias``...)."""
        return {n: t for n in _UNIT_FIELDS if (t := getattr(self, n)) is not None}

    def scaled(self, strength: float) -> Units:
        """The same units writing ``strength`` times as much (``down`` scaled)."""
        return dataclasses.replace(self, down=self.down * strength)

    def detached(self) -> Units:
        """A copy holding detached clones (a fitted edit, no longer tied to the optimiser)."""
        return Units(**{n: t.detach().clone() for n, t in self.named().items()})


_UNIT_FIELDS = ("gate", "up", "down", "gate_bias", "up_bias")


@dataclass
class Gate:
    """A switch on a layer's added vector, read from the hidden state: the vector ``add`` is
    written as ``g(x) add``, ``x`` the MLP's input, ``u = weight . x + bias`` and
    ``g = (act(u) - act(u - span)) / span`` with the MLP's own activation: about 0 where
    ``u < 0`` (SiLU: at least -0.28 / span, under 0.01 / span below u = -6.5) and about 1 where
    ``u > span`` (at most 1 + 0.28 / span), linear between. Two new units of the gated MLP compute exactly this
    (:meth:`units`), so a gated vector folds into a plain transformers model (a wider MLP with
    biases), where a vector switched by a sigmoid would not.

    Attributes:
        weight: ``[hidden]`` the switch's direction in the MLP's input (a linear classifier's,
            scaled: :func:`prunescope.edit.methods.gate_probe`).
        bias: the switch's offset.
        span: how far ``u`` rises from off (0) to on (``span``).
    """

    weight: torch.Tensor
    bias: float
    span: float = 8.0

    def units(self, add: torch.Tensor) -> Units:
        """The two units that write ``g(x) add``: both read ``u`` (the second shifted by
        ``-span``), with up rows zero and up biases ``+-1 / span``; their down columns are views of
        ``add``, so gradients reach it and in-place changes of it take effect at once."""
        hidden = self.weight.shape[0]
        w = self.weight.to(add).unsqueeze(0).expand(2, hidden)  # [2, hidden]
        return Units(
            gate=w, up=torch.zeros_like(w), down=add.unsqueeze(1).expand(hidden, 2),  # down [hidden, 2]
            gate_bias=add.new_tensor([self.bias, self.bias - self.span]),
            up_bias=add.new_tensor([1.0 / self.span, -1.0 / self.span]),
        )

    def detached(self) -> Gate:
        return Gate(self.weight.detach().clone(), self.bias, self.span)


@dataclass
class LayerEdit:
    """The edit of one decoder layer's writers.

    Attributes:
        layer: 0-based decoder layer index.
        add: ``[hidden]`` vector added to the MLP writer's output at every position, or None.
        direction: ``[hidden]`` non-zero vector ``d`` projected out of both writers' outputs, or
            None; it need not be unit length: the projection divides by ``d . d``, so a direction
            being optimised stays a leaf tensor.
        ablate_scale: ``s`` in ``out - s (out . d) d / (d . d)``; 1 removes the direction fully.
        units: new units of the layer's gated MLP (:class:`Units`), or None; not combined with
            a direction in the same layer (the projection would have to act on them too).
        gate: a switch on ``add`` (:class:`Gate`), or None (``add`` at every position); the
            gated vector is written by two new units, so it takes neither units nor a
            direction beside it in the same layer.
    """

    layer: int
    add: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    ablate_scale: float = 1.0
    units: Units | None = None
    gate: Gate | None = None

    @property
    def add_everywhere(self) -> torch.Tensor | None:
        """The vector added at every position (``add`` with no gate switching it), or None: what
        a bias on the MLP's writer holds exactly."""
        return self.add if self.gate is None else None

    def written_units(self) -> Units | None:
        """The new units this entry adds to its MLP: its own, or the gate's two writing ``add``."""
        if self.gate is not None and self.add is not None:
            return self.gate.units(self.add)
        return self.units


@dataclass
class Edit:
    """Edits of several decoder layers, applied together (one entry per layer at most)."""

    layers: list[LayerEdit] = field(default_factory=list)

    def check(self, model: nn.Module) -> None:
        """Check the edit against ``model``; nothing is changed.

        Raises:
            PrunescopeError: a layer index outside the model or repeated, a vector that is not
                ``[hidden]``, not finite or (a direction) zero, a scale that is not finite, a
                family with no known writers, or a direction on a family whose attention
                writer prunescope does not know; units of mismatched shapes or not finite, a
                gate without a vector, with units or a direction beside it, or with a weight,
                bias or span that is not valid; units or a gate on a family without separate
                gate and up projections.
        """
        writers = _writers(model)
        count = len(models.adapter_for(model).layers(model))
        hidden = families.weight_matrix(_module(model, 0, writers.mlp)).shape[0]
        seen: set[int] = set()
        for entry in self.layers:
            _check_layer(entry, count, hidden, writers, seen)
            seen.add(entry.layer)

    @property
    def nbytes(self) -> int:
        """Bytes held by the edit's tensors (what saving it costs)."""
        return sum(t.numel() * t.element_size() for e in self.layers for t in _all_tensors(e).values())

    def scaled(self, strength: float) -> Edit:
        """The edit writing ``strength`` times as much: added vectors and the units' ``down``
        scaled, directions and their scales as they are."""
        return Edit([
            dataclasses.replace(e, add=None if e.add is None else e.add * strength,
                                units=None if e.units is None else e.units.scaled(strength))
            for e in self.layers
        ])

    def detached(self) -> Edit:
        """A copy holding detached clones of every tensor (the fit's result)."""
        return Edit([
            dataclasses.replace(e, add=None if e.add is None else e.add.detach().clone(),
                                direction=None if e.direction is None else e.direction.detach().clone(),
                                units=None if e.units is None else e.units.detached(),
                                gate=None if e.gate is None else e.gate.detached())
            for e in self.layers
        ])

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: index, norm of the added vector, whether a direction is removed, its scale
        (JSON-ready, for reports)."""
        return [
            {
                "layer": e.layer,
                "add_norm": None if e.add is None else float(e.add.detach().float().norm()),
                "ablates": e.direction is not None,
                "ablate_scale": e.ablate_scale if e.direction is not None else None,
                "units": 0 if e.units is None else e.units.count,
                "gated": e.gate is not None,
            }
            for e in self.layers
        ]


# --------------------------------------------------------------------------- where the writers are


@dataclass(frozen=True)
class _Writers:
    """The family and the writer paths relative to a decoder layer (attention may be unknown)."""

    family: Family
    mlp: str
    attention: str | None
    gated: tuple[str, str] | None = None  # (gate, up) projections where they are separate modules


def _writers(model: nn.Module) -> _Writers:
    """The residual-stream writers of ``model``'s family, from its unit layouts."""
    family = families.family_for(model)
    layouts = family.layouts(model.config)
    mlp = layouts[MLP].writer
    if mlp is None:  # every family in families.FAMILIES names one; a guard for new ones
        raise PrunescopeError(f"{family.name}'s layout names no MLP writer, so it cannot be edited")
    attention = layouts[Q].writer if Q in layouts else None
    reads = [c for c in layouts[MLP].cuts if c.side == "out"]
    separate = len(reads) == 2 and len({c.module for c in reads}) == 2 and not any(c.offset for c in reads)
    return _Writers(family, mlp, attention, (reads[0].module, reads[1].module) if separate else None)


def _mlp_path(writers: _Writers) -> str:
    """The MLP module: the writer's parent (``mlp.down_proj`` -> ``mlp``)."""
    return writers.mlp.rpartition(".")[0]


def _activation(model: nn.Module, layer: int, writers: _Writers) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP's activation (``act_fn``) of decoder layer ``layer``."""
    act = getattr(_module(model, layer, _mlp_path(writers)), "act_fn", None)
    if not callable(act):
        raise PrunescopeError(f"{writers.family.name}'s MLP has no act_fn, so new units cannot compute like its own")
    return act


def _module(model: nn.Module, layer: int, path: str) -> nn.Module:
    """The submodule ``path`` of decoder layer ``layer``."""
    return models.adapter_for(model).layers(model)[layer].get_submodule(path)


def _check_layer(entry: LayerEdit, count: int, hidden: int, writers: _Writers, seen: set[int]) -> None:
    """One clear error for the first thing wrong with ``entry``."""
    where = f"the edit of layer {entry.layer}"
    if not 0 <= entry.layer < count:
        raise PrunescopeError(
            f"layer {entry.layer} is outside the model's {count} decoder layers (0-{count - 1})"
        )
    if entry.layer in seen:
        raise PrunescopeError(f"layer {entry.layer} is edited twice; give each layer one LayerEdit")
    for name, vector in _tensors(entry).items():
        _check_vector(f"{where}: {name}", vector, hidden)
    if entry.units is not None:
        _check_units(where, entry, hidden, writers)
    if entry.gate is not None:
        _check_gate(where, entry, hidden, writers)
    if entry.direction is None:
        return
    if not math.isfinite(entry.ablate_scale):
        raise PrunescopeError(f"{where}: ablate_scale must be a finite number, got {entry.ablate_scale}")
    if float(entry.direction.detach().float().norm()) == 0.0:
        raise PrunescopeError(f"{where}: direction is the zero vector; give a non-zero [{hidden}] vector")
    if writers.attention is None:
        raise PrunescopeError(
            f"{writers.family.name}'s layout names no attention writer, so a direction cannot be "
            f"projected out of both writers; an added vector (add) works for it"
        )


def _check_vector(what: str, vector: torch.Tensor, hidden: int) -> None:
    """A ``[hidden]`` floating tensor with finite entries."""
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
        raise PrunescopeError(f"{what} must be a floating-point tensor of shape [{hidden}], got {vector!r:.60}")
    if tuple(vector.shape) != (hidden,):
        raise PrunescopeError(f"{what} has shape {tuple(vector.shape)}; expected [{hidden}] (the hidden size)")
    if not bool(torch.isfinite(vector.detach()).all()):
        raise PrunescopeError(f"{what} holds NaN or infinite entries; every entry must be finite")


def _check_units(where: str, entry: LayerEdit, hidden: int, writers: _Writers) -> None:
    """Units of matching ``[k, hidden]``, ``[k, hidden]``, ``[hidden, k]`` finite floating
    tensors, on a family whose gate and up projections are separate modules, without a
    direction in the same layer."""
    _refuse_ungated(writers, f"{where}: ")
    if entry.direction is not None:
        raise PrunescopeError(f"{where}: units and a direction in the same layer are not supported; edit the "
                              f"direction in another layer")
    units = entry.units
    assert units is not None
    for name in ("gate", "up", "down"):
        t = getattr(units, name)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise PrunescopeError(f"{where}: units.{name} must be a 2-D floating-point tensor, got {t!r:.60}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise PrunescopeError(f"{where}: units.{name} holds NaN or infinite entries; every entry must be finite")
    k = units.count
    shapes = {"gate": (k, hidden), "up": (k, hidden), "down": (hidden, k), "gate_bias": (k,), "up_bias": (k,)}
    for name, t in units.named().items():
        if name.endswith("_bias") and (not isinstance(t, torch.Tensor) or not t.is_floating_point()
                                       or not bool(torch.isfinite(t.detach()).all())):
            raise PrunescopeError(f"{where}: units.{name} must be a finite floating-point tensor of shape [{k}]")
        got, want = tuple(t.shape), shapes[name]
        if got != want or k < 1:
            raise PrunescopeError(f"{where}: units.{name} has shape {got}; expected {list(want)} (gate [k, hidden], "
                                  f"up [k, hidden], down [hidden, k], gate_bias and up_bias [k], k >= 1)")


def _check_gate(where: str, entry: LayerEdit, hidden: int, writers: _Writers) -> None:
    """A gate on an added vector, with a finite ``[hidden]`` weight, a finite bias and a finite
    positive span, alone in its layer with the vector (no units, no direction), on a family
    whose MLP the gate's units can widen."""
    gate = entry.gate
    assert gate is not None
    _refuse_ungated(writers, f"{where}: a gated vector is written by two new units; ")
    if entry.add is None:
        raise PrunescopeError(f"{where}: a gate switches an added vector; give add as well")
    if entry.units is not None or entry.direction is not None:
        raise PrunescopeError(f"{where}: a gated vector takes neither units nor a direction in the same layer; "
                              f"edit them in another layer")
    _check_vector(f"{where}: gate.weight", gate.weight, hidden)
    for name in ("bias", "span"):
        value = getattr(gate, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or (name == "span" and value <= 0):
            raise PrunescopeError(f"{where}: gate.{name} must be a finite number{' > 0' if name == 'span' else ''}, "
                                  f"got {value!r}")


def _tensors(entry: LayerEdit) -> dict[str, torch.Tensor]:
    """The entry's vectors that are set, by field name."""
    return {k: v for k, v in (("add", entry.add), ("direction", entry.direction)) if v is not None}


def _all_tensors(entry: LayerEdit) -> dict[str, torch.Tensor]:
    """Every tensor of the entry, by the name it is saved under (``units.gate``, ``gate.weight``...)."""
    units = {} if entry.units is None else {f"units.{n}": t for n, t in entry.units.named().items()}
    gate = {} if entry.gate is None else {"gate.weight": entry.gate.weight}
    return {**_tensors(entry), **units, **gate}


# --------------------------------------------------------------------------- hooks


def _project(x: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """``x - s (x . d) d / (d . d)`` over the last dimension; x: [..., hidden], d: [hidden]."""
    d = direction.to(dtype=x.dtype, device=x.device)  # [hidden]
    coef = (x @ d) / (d @ d)  # [...]
    return x - scale * coef.unsqueeze(-1) * d  # [..., hidden]


def _projection_hook(direction: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
    """A forward hook replacing a writer's output by its projection."""

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return _project(output, direction, scale)

    return hook


def _unit_values(units: Units, act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the units compute from the MLP's input ``x`` ``[..., hidden]``: ``[..., k]``."""
    gate, up = (t.to(dtype=x.dtype, device=x.device) for t in (units.gate, units.up))
    u, v = x @ gate.T, x @ up.T  # [..., k] each
    if units.gate_bias is not None:
        u = u + units.gate_bias.to(u)
    if units.up_bias is not None:
        v = v + units.up_bias.to(v)
    return act(u) * v


def _units_hook(units: Units, act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A forward hook on the MLP adding what ``units`` write, computed from the MLP's input."""

    def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        values = _unit_values(units, act, args[0])  # [..., k]
        return output + values @ units.down.to(dtype=values.dtype, device=values.device).T  # [..., hidden]

    return hook


def require_gated(model: nn.Module) -> _Writers:
    """``model``'s writers, checked to include separate gate and up projections (new units need them).

    Raises:
        PrunescopeError: a family whose MLP is not gated that way (Phi-3's fused gate_up, GPT-2, OPT).
    """
    writers = _writers(model)
    _refuse_ungated(writers)
    return writers


def _refuse_ungated(writers: _Writers, where: str = "") -> None:
    """The one error for new units on a family whose MLP has no separate gate and up projections."""
    if writers.gated is None:
        raise PrunescopeError(f"{where}new units need a gated MLP with separate gate and up projections (Llama, "
                              f"Mistral, Qwen2, Qwen3); {writers.family.name}'s MLP is not one")


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer ``layer``'s MLP module (whose input new units read)."""
    return _module(model, layer, _mlp_path(_writers(model)))


def new_units(model: nn.Module, layer: int, count: int, generator: torch.Generator) -> Units:
    """``count`` units for decoder layer ``layer``'s gated MLP to start a fit from: gate and up
    rows drawn from a normal with the standard deviation of the layer's own rows (so they read
    the input as its units do), down zero (so they write nothing yet); float32, on the MLP's
    device, requiring grad."""
    writers = require_gated(model)
    device = models.input_device(model)  # the compute device, also when the weights are on disk
    rows = []
    for path in writers.gated:
        w = models.weight_of(_module(model, layer, path)).detach()  # [inter, hidden]
        drawn = torch.randn(count, w.shape[1], generator=generator) * float(w.float().std())
        rows.append(drawn.to(device))
    down = torch.zeros(rows[0].shape[1], count, device=rows[0].device)  # [hidden, k]
    return Units(*(t.requires_grad_(True) for t in (rows[0], rows[1], down)))


def unit_values(model: nn.Module, layer: int, units: Units, x: torch.Tensor) -> torch.Tensor:
    """What ``units`` in decoder layer ``layer`` compute from the MLP's input ``x`` ``[..., hidden]``:
    ``[..., k]`` (before they are written along ``down``)."""
    return _unit_values(units, _activation(model, layer, _writers(model)), x)


@contextmanager
def applied(model: nn.Module, edit: Edit) -> Iterator[None]:
    """While active, ``model`` computes the edited hidden outputs (forward hooks on the writers).

    Per edited layer: the MLP writer's output ``y -> P(y) + add`` and the attention writer's
    ``y -> P(y)`` (P the identity without a direction); new units, and a gated vector's two,
    add what they write to the MLP's output (a hook on the MLP module, which reads its input).
    The edit's tensors are used as given, neither detached nor copied, so gradients reach ``add`` (or ``direction``) when they require
    grad, and changing them in place between forward passes takes effect at once. The hooks are
    removed on exit, also when the block raises.

    Raises:
        PrunescopeError: from :meth:`Edit.check`, before any hook is registered.
    """
    edit.check(model)
    writers = _writers(model)
    with ExitStack() as stack:
        for entry in edit.layers:
            layer = models.adapter_for(model).layers(model)[entry.layer]
            if entry.direction is not None:
                for path in _edited_paths(entry, writers):
                    hook = _projection_hook(entry.direction, entry.ablate_scale)
                    stack.callback(layer.get_submodule(path).register_forward_hook(hook).remove)
            if entry.add_everywhere is not None:  # after the projection: it runs after it
                stack.enter_context(apply.output_biases(layer, [writers.mlp], {writers.mlp: entry.add}))
            units = entry.written_units()
            if units is not None:
                hook = _units_hook(units, _activation(model, entry.layer, writers))
                stack.callback(layer.get_submodule(_mlp_path(writers)).register_forward_hook(hook).remove)
        yield


# --------------------------------------------------------------------------- folding


def fold(model: nn.Module, edit: Edit) -> nn.Module:
    """Write ``edit`` into the weights, so that with no hooks the model computes what
    :func:`applied` computes; the caller must use the returned model.

    Each edited writer ``y = x W^T + b`` becomes ``W <- P W``, ``b <- P b + add``
    (``P = I - s d d^T / (d . d)``), in place. When an ``add`` meets an MLP writer with no bias,
    the family's bias flag is set in a copy of the config (Llama: ``mlp_bias``, which gives
    every MLP projection of every layer a bias); new units widen every layer's MLP by the most
    units any layer adds (zeros where a layer adds fewer). In either case the model is rebuilt
    from the new config with zeros in the new places: the returned model is then a new object
    that shares the old one's untouched tensors (discard the old one). ``save_pretrained`` of
    the result loads in plain ``transformers``.

    Raises:
        PrunescopeError: from :meth:`Edit.check`, or an ``add`` (or a gated vector, or units
            with biases) on a family with no such MLP bias in plain transformers (Mistral, Qwen2,
            Qwen3, Phi-3...); checked before anything changes.
    """
    edit.check(model)
    writers = _writers(model)
    config = _folded_config(model, edit, writers)
    adapter = models.adapter_for(model)
    new_tensors: dict[str, torch.Tensor] = {}
    for entry in edit.layers:
        for path in _edited_paths(entry, writers):
            add = entry.add_everywhere if path == writers.mlp else None
            bias = _fold_writer(adapter.layers(model)[entry.layer].get_submodule(path), entry, add)
            if bias is not None:
                new_tensors[f"{adapter.layers_path}.{entry.layer}.{path}.bias"] = bias
    if config is None:
        return model
    new_tensors.update(_widened(model, edit, writers))
    log.info("folding the edit: rebuilding %s as %s", writers.family.name, _config_change(model.config, config))
    return apply.rebuild_model(model, config, {**model.state_dict(), **new_tensors})


def _edited_paths(entry: LayerEdit, writers: _Writers) -> list[str]:
    """The writers ``entry`` changes in place: both with a direction (checked to be known), the
    MLP's with an added vector, none for units alone or a gated vector (their units are
    appended by :func:`_widened`)."""
    if entry.direction is None:
        return [writers.mlp] if entry.add_everywhere is not None else []
    assert writers.attention is not None  # Edit.check refuses a direction otherwise
    return [writers.attention, writers.mlp]


def _folded_config(model: nn.Module, edit: Edit, writers: _Writers) -> Any | None:
    """The config of the folded model when folding changes it (the MLP bias flag set where an
    ``add`` meets a writer without bias, or units with biases meet gate/up projections without;
    the MLP widened by new units), else None."""
    needs = [(e.layer, what) for e in edit.layers for what in _missing_biases(model, e, writers)]
    extra = _extra_units(edit)
    if not needs and not extra:
        return None
    family = writers.family
    if needs and not can_hold_biases(family):
        layer, what = needs[0]
        edited = "an added vector" if what == writers.mlp else "units with biases (a gated vector's)"
        raise PrunescopeError(
            f"{family.name} has no {what} bias in plain transformers, so {edited} (layer {layer}) cannot be "
            f"folded into its weights; measure the edit with hooks (applied) instead, or fold a pure ablation "
            f"(direction, no add)"
        )
    shape = families.shape_of(family, model.config)
    shape = dataclasses.replace(shape, intermediate=shape.intermediate + extra)
    count = len(models.adapter_for(model).layers(model))
    flags = tuple(f for f in (family.bias_flag(MLP),) if isinstance(f, str)) if needs else ()  # True: always there
    return families.shrunk_config(family, model.config, shape, list(range(count)), flags)


def can_hold_biases(family: Family) -> bool:
    """Whether ``family``'s MLP has biases (GPT-2's always) or a config flag that turns them on in
    plain transformers (Llama's ``mlp_bias``, OPT's ``enable_bias``; not Mistral, Qwen2, Qwen3,
    Phi-3): what folding a vector added at every position, or a gated vector's units, needs."""
    return family.bias_flag(MLP) is not None


def _missing_biases(model: nn.Module, entry: LayerEdit, writers: _Writers) -> list[str]:
    """The MLP biases folding ``entry`` needs and the model lacks: the writer's (``down_proj``)
    for an ``add`` written at every position, ``gate/up`` for units with biases."""
    missing = []
    if entry.add_everywhere is not None and _module(model, entry.layer, writers.mlp).bias is None:
        missing.append(writers.mlp)
    units = entry.written_units()
    if units is not None and units.biased and writers.gated is not None \
            and _module(model, entry.layer, writers.gated[0]).bias is None:
        missing.append("gate/up")
    return missing


def _extra_units(edit: Edit) -> int:
    """How much wider folding makes every layer's MLP: the most units any layer adds."""
    return max((u.count for e in edit.layers if (u := e.written_units()) is not None), default=0)


def _config_change(old: Any, new: Any) -> str:
    """The config entries folding changed, ``key old -> new``, for the log."""
    a, b = old.to_dict(), new.to_dict()
    return ", ".join(f"{k} {a.get(k)} -> {b[k]}" for k in b if a.get(k) != b[k]) or "the same config"


@torch.no_grad()
def _widened(model: nn.Module, edit: Edit, writers: _Writers) -> dict[str, torch.Tensor]:
    """The gate, up and down weights (and biases) of every decoder layer with the edit's units
    appended, as state-dict entries: rows of gate/up, columns of down, zeros in layers that add
    fewer than the most (their new units compute ``act(0) * 0 = 0``). Gate and up biases are
    written where the model has them or some units carry them (the config then has the flag)."""
    extra = _extra_units(edit)
    if not extra:
        return {}
    assert writers.gated is not None  # Edit.check refuses units otherwise
    adapter = models.adapter_for(model)
    units = {e.layer: u for e in edit.layers if (u := e.written_units()) is not None}
    biased = any(u.biased for u in units.values())
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.layers(model)):
        added = units.get(i)
        prefix = f"{adapter.layers_path}.{i}."
        for path, name in ((writers.gated[0], "gate"), (writers.gated[1], "up"), (writers.mlp, "down")):
            module = layer.get_submodule(path)
            w = module.weight.detach()  # gate/up [inter, hidden], down [hidden, inter]
            dim = 1 if name == "down" else 0
            shape = list(w.shape)
            shape[dim] = extra
            new = w.new_zeros(shape)  # gate/up [extra, hidden], down [hidden, extra]
            if added is not None:
                new.narrow(dim, 0, added.count).copy_(getattr(added, name).to(new))
            out[prefix + path + ".weight"] = torch.cat([w, new], dim=dim)
            if name != "down" and (module.bias is not None or biased):  # down's bias is over hidden: unchanged
                out[prefix + path + ".bias"] = _widened_bias(module, extra, added, name)
    return out


def _widened_bias(module: nn.Module, extra: int, added: Units | None, name: str) -> torch.Tensor:
    """A gate or up projection's ``[inter + extra]`` bias: its own (zeros where it has none),
    then the added units' ``{name}_bias`` (zeros where they carry none, and past them)."""
    w = module.weight.detach()  # [inter, hidden]
    own = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    new = own.new_zeros(extra)
    bias = None if added is None else getattr(added, f"{name}_bias")
    if bias is not None:
        new[: added.count] = bias.detach().to(new)
    return torch.cat([own, new])


@torch.no_grad()
def _fold_writer(module: nn.Module, entry: LayerEdit, add: torch.Tensor | None) -> torch.Tensor | None:
    """Fold the projection into ``module``'s weight and bias, and the ``add`` into its bias where
    it has one (written by :func:`prunescope.pruning.apply.set_weight_and_bias`); returns the
    ``[out]`` bias to create where it has none (else None)."""
    w = families.weight_matrix(module)  # [out, in] view (Conv1D stores [in, out])
    bias = None if module.bias is None else module.bias.detach().float()  # [out]
    if entry.direction is not None:
        d = entry.direction.detach().float()
        w = _project(w.detach().float().T, d, entry.ablate_scale).T  # P W
        bias = None if bias is None else _project(bias, d, entry.ablate_scale)
    if add is not None and bias is not None:
        bias = bias + add.detach().float().to(bias.device)
    apply.set_weight_and_bias(module, w, bias)
    if add is None or module.bias is not None:
        return None
    return add.detach().to(device=w.device, dtype=module.weight.dtype).clone()


# --------------------------------------------------------------------------- saving


def save_edit(edit: Edit, path: str | Path) -> Path:
    """Save ``edit`` as one safetensors file: the tensors (``layer.<i>.add``,
    ``layer.<i>.direction``, ``layer.<i>.units.gate`` / ``.up`` / ``.down`` / ``.gate_bias`` /
    ``.up_bias``, ``layer.<i>.gate.weight``; float32... as given, on CPU) and the layers, scales
    and gates' bias and span as JSON in the file's metadata. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        f"layer.{e.layer}.{name}": t.detach().cpu().contiguous()
        for e in edit.layers for name, t in _all_tensors(e).items()
    }
    meta = {"format": _FORMAT, "layers": [_entry_meta(e) for e in edit.layers]}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(meta)})
    return path


def load_edit(path: str | Path) -> Edit:
    """Read an edit written by :func:`save_edit` (tensors on CPU).

    Raises:
        PrunescopeError: a missing file, or a file that is not a prunescope edit.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise PrunescopeError(f"edit file {path} does not exist; give a file written by save_edit")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_METADATA_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        if int(meta["format"]) > _FORMAT:
            raise PrunescopeError(f"{path} is an edit file of format {meta['format']}, newer than this prunescope "
                                  f"reads ({_FORMAT}); upgrade prunescope")
        return Edit([_entry_from(e, tensors) for e in meta["layers"]])
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:  # KeyError: not our metadata
        raise PrunescopeError(f"{path} is not a prunescope edit file written by save_edit ({exc!r})") from exc


def _entry_meta(entry: LayerEdit) -> dict[str, Any]:
    """The JSON part of one entry: its layer, ablation scale, and gate's bias and span."""
    meta: dict[str, Any] = {"layer": entry.layer, "ablate_scale": entry.ablate_scale}
    if entry.gate is not None:
        meta["gate"] = {"bias": float(entry.gate.bias), "span": float(entry.gate.span)}
    return meta


def _entry_from(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerEdit:
    """One :class:`LayerEdit` from its JSON entry and the file's tensors."""
    layer = int(meta["layer"])
    parts = {n: tensors.get(f"layer.{layer}.units.{n}") for n in _UNIT_FIELDS}
    units = None if all(p is None for p in parts.values()) else Units(**parts)  # a missing part fails Edit.check
    gate = None
    if "gate" in meta:
        gate = Gate(tensors[f"layer.{layer}.gate.weight"], float(meta["gate"]["bias"]), float(meta["gate"]["span"]))
    return LayerEdit(
        layer, tensors.get(f"layer.{layer}.add"), tensors.get(f"layer.{layer}.direction"),
        float(meta["ablate_scale"]), units, gate,
    )
