"""The one mechanism that edits hidden outputs, and folding an edit into ordinary weights.

An :class:`Edit` acts, per decoder layer, on the two modules that write into the residual stream:
the attention writer (``o_proj``) and the MLP writer (``down_proj``), located through
:mod:`prunescope.families`. Per layer it may

- add a vector ``a`` to the MLP writer's output at every position (steering, fitted vectors);
- project a direction ``d`` out of both writers' outputs (ablation):
  ``P(x) = x - s (x . d) d / (d . d)``, ``s = 1`` being the full orthogonal projection.

:func:`applied` does this with forward hooks (used while fitting and measuring: gradients reach
the edit's tensors); :func:`fold` writes the same function into the weights, so that the model
saved with ``save_pretrained`` loads in plain ``transformers`` and computes what the hooked model
did: for a writer ``y = x W^T + b``, ``W <- P W`` and ``b <- P b + a``. Where the MLP writer has
no bias, the family's config flag (Llama's ``mlp_bias``) is turned on and the model rebuilt with
zero biases everywhere else, as structured pruning does for bias compensation.
"""

from __future__ import annotations

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
_FORMAT = 1


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
    """

    layer: int
    add: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    ablate_scale: float = 1.0


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
                writer prunescope does not know.
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
        """Bytes held by the edit's vectors (what saving it costs)."""
        return sum(t.numel() * t.element_size() for e in self.layers for t in _tensors(e).values())

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: index, norm of the added vector, whether a direction is removed, its scale
        (JSON-ready, for reports)."""
        return [
            {
                "layer": e.layer,
                "add_norm": None if e.add is None else float(e.add.detach().float().norm()),
                "ablates": e.direction is not None,
                "ablate_scale": e.ablate_scale if e.direction is not None else None,
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


def _writers(model: nn.Module) -> _Writers:
    """The residual-stream writers of ``model``'s family, from its unit layouts."""
    family = families.family_for(model)
    layouts = family.layouts(model.config)
    mlp = layouts[MLP].writer
    if mlp is None:  # every family in families.FAMILIES names one; a guard for new ones
        raise PrunescopeError(f"{family.name}'s layout names no MLP writer, so it cannot be edited")
    attention = layouts[Q].writer if Q in layouts else None
    return _Writers(family, mlp, attention)


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


def _tensors(entry: LayerEdit) -> dict[str, torch.Tensor]:
    """The entry's vectors that are set, by field name."""
    return {k: v for k, v in (("add", entry.add), ("direction", entry.direction)) if v is not None}


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


@contextmanager
def applied(model: nn.Module, edit: Edit) -> Iterator[None]:
    """While active, ``model`` computes the edited hidden outputs (forward hooks on the writers).

    Per edited layer: the MLP writer's output ``y -> P(y) + add`` and the attention writer's
    ``y -> P(y)`` (P the identity without a direction). The edit's tensors are used as given,
    neither detached nor copied, so gradients reach ``add`` (or ``direction``) when they require
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
            if entry.add is not None:  # registered after the projection: it runs after it
                stack.enter_context(apply.output_biases(layer, [writers.mlp], {writers.mlp: entry.add}))
        yield


# --------------------------------------------------------------------------- folding


def fold(model: nn.Module, edit: Edit) -> nn.Module:
    """Write ``edit`` into the weights, so that with no hooks the model computes what
    :func:`applied` computes; the caller must use the returned model.

    Each edited writer ``y = x W^T + b`` becomes ``W <- P W``, ``b <- P b + add``
    (``P = I - s d d^T / (d . d)``), in place. When an ``add`` meets an MLP writer with no bias,
    the family's bias flag is set in a copy of the config (Llama: ``mlp_bias``, which gives
    every MLP projection of every layer a bias) and the model is rebuilt from it with zero
    biases elsewhere: the returned model is then a new object that shares the old one's tensors
    (discard the old one). ``save_pretrained`` of the result loads in plain ``transformers``.

    Raises:
        PrunescopeError: from :meth:`Edit.check`, or an ``add`` on a family with no MLP writer
            bias in plain transformers (Mistral, Qwen2, Phi-3...); checked before anything changes.
    """
    edit.check(model)
    writers = _writers(model)
    config = _bias_config(model, edit, writers)
    adapter = models.adapter_for(model)
    new_biases: dict[str, torch.Tensor] = {}
    for entry in edit.layers:
        for path in _edited_paths(entry, writers):
            add = entry.add if path == writers.mlp else None
            bias = _fold_writer(adapter.layers(model)[entry.layer].get_submodule(path), entry, add)
            if bias is not None:
                new_biases[f"{adapter.layers_path}.{entry.layer}.{path}.bias"] = bias
    if config is None:
        return model
    log.info("folding added vectors: rebuilding %s with %s", writers.family.name, writers.family.bias_flag(MLP))
    return apply.rebuild_model(model, config, {**model.state_dict(), **new_biases})


def _edited_paths(entry: LayerEdit, writers: _Writers) -> list[str]:
    """The writers ``entry`` changes: both with a direction (checked to be known), else the MLP's."""
    if entry.direction is None:
        return [writers.mlp]
    assert writers.attention is not None  # Edit.check refuses a direction otherwise
    return [writers.attention, writers.mlp]


def _bias_config(model: nn.Module, edit: Edit, writers: _Writers) -> Any | None:
    """The config with the MLP bias flag set when an ``add`` meets a writer without bias, else None."""
    needs = [
        e.layer for e in edit.layers
        if e.add is not None and _module(model, e.layer, writers.mlp).bias is None
    ]
    if not needs:
        return None
    family = writers.family
    flag = family.bias_flag(MLP)
    if not isinstance(flag, str):
        raise PrunescopeError(
            f"{family.name} has no {writers.mlp} bias in plain transformers, so an added vector "
            f"(layer {needs[0]}) cannot be folded into its weights; measure the edit with hooks "
            f"(applied) instead, or fold a pure ablation (direction, no add)"
        )
    shape = families.shape_of(family, model.config)
    count = len(models.adapter_for(model).layers(model))
    return families.shrunk_config(family, model.config, shape, list(range(count)), (flag,))


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
    """Save ``edit`` as one safetensors file: the vectors as tensors (``layer.<i>.add``,
    ``layer.<i>.direction``, float32... as given, on CPU) and the layers and scales as JSON in the
    file's metadata. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        f"layer.{e.layer}.{name}": t.detach().cpu().contiguous()
        for e in edit.layers for name, t in _tensors(e).items()
    }
    meta = {"format": _FORMAT, "layers": [{"layer": e.layer, "ablate_scale": e.ablate_scale} for e in edit.layers]}
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
        return Edit([_entry_from(e, tensors) for e in meta["layers"]])
    except (KeyError, TypeError, ValueError, SafetensorError) as exc:  # KeyError: not our metadata
        raise PrunescopeError(f"{path} is not a prunescope edit file written by save_edit ({exc!r})") from exc


def _entry_from(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LayerEdit:
    """One :class:`LayerEdit` from its JSON entry and the file's tensors."""
    layer = int(meta["layer"])
    return LayerEdit(
        layer, tensors.get(f"layer.{layer}.add"), tensors.get(f"layer.{layer}.direction"),
        float(meta["ablate_scale"]),
    )
