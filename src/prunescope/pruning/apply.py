"""The only place that mutates modules for the LLM pruning pipeline: hard zeros from keep-masks,
updated weight values (SparseGPT), and structured removal (writers compensated in place, decoder
layers rebuilt smaller, layers dropped, the model rebuilt from its shrunk config)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prunescope.families import UnitLayout, weight_dim, weight_matrix
from prunescope.pruning.structured import removed_from, unit_columns


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` tensor of the submodule ``name``; ValueError if it has none."""
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    return weight


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, every weight entry whose keep-mask is False.

    Args:
        model: the model to modify.
        masks: module name -> ``BoolTensor`` shaped like that module's ``weight`` (True = keep).

    Raises:
        ValueError: a name that is not a module with a weight, or a mask of the wrong shape;
            checked for every mask before any weight changes, so nothing is half applied.
    """
    targets = []
    for name, mask in masks.items():
        weight = _weight_of(model, name)
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for {name}.weight has shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                f"expected a bool mask of shape {tuple(weight.shape)}"
            )
        targets.append((weight, mask))
    for weight, mask in targets:
        weight.masked_fill_(~mask.to(weight.device), 0)


@torch.no_grad()
def apply_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Replace, in place, the weight values of the named modules (e.g. SparseGPT's updated weights).

    Args:
        model: the model to modify.
        weights: module name -> tensor shaped like that module's ``weight``.

    Raises:
        ValueError: a name that is not a module with a weight, or a tensor of the wrong shape;
            checked for every entry before any weight changes.
    """
    targets = []
    for name, new in weights.items():
        weight = _weight_of(model, name)
        if new.shape != weight.shape:
            raise ValueError(
                f"new weight for {name} has shape {tuple(new.shape)}; expected {tuple(weight.shape)}"
            )
        targets.append((weight, new))
    for weight, new in targets:
        weight.copy_(new.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def add_to_weights(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add ``deltas[name]`` (``[out, in]``, whatever the module stores: GPT-2's Conv1D keeps
    ``[in, out]``) to each named module's weight, in place; shapes checked before any change."""
    targets = []
    for name, delta in deltas.items():
        _weight_of(model, name)  # a module with a weight, or ValueError
        w = weight_matrix(model.get_submodule(name))  # [out, in] view
        if w.is_meta:
            raise ValueError(f"{name}'s weight is on the meta device (kept on disk): it cannot change in place")
        if delta.shape != w.shape:
            raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}; expected {tuple(w.shape)}")
        targets.append((w, delta))
    for w, delta in targets:
        w.add_(delta.to(device=w.device, dtype=w.dtype))


@contextmanager
def added_to_weights(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """:func:`add_to_weights` for the block; the original weights are put back exactly after."""
    saved = {name: _weight_of(model, name).detach().clone() for name in deltas}
    add_to_weights(model, deltas)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                _weight_of(model, name).copy_(weight)


# --------------------------------------------------------------------------- structured removal


@torch.no_grad()
def set_weight_and_bias(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Overwrite, in place, a Linear's (or Conv1D's) weight given as ``[out, in]`` and, when
    given, its existing ``[out]`` bias (edits folded into the weights)."""
    w = weight_matrix(module)  # [out, in] view (Conv1D stores [in, out])
    if weight.shape != w.shape:
        raise ValueError(f"new weight has shape {tuple(weight.shape)}; expected {tuple(w.shape)}")
    if bias is not None and (module.bias is None or bias.shape != module.bias.shape):
        raise ValueError("a new bias needs an existing bias of the same shape")
    w.copy_(weight.to(device=w.device, dtype=w.dtype))
    if bias is not None:
        module.bias.copy_(bias.to(device=module.bias.device, dtype=module.bias.dtype))


@torch.no_grad()
def set_writer_columns(
    layer: nn.Module, writer: str, kept_cols: torch.Tensor, new_kept: torch.Tensor | None
) -> None:
    """Make the writer compute what the pruned layer will, at its current shape.

    Removed input columns become zero (their units no longer contribute) and kept columns take
    their compensated values (``new_kept``: ``[out, k]``; unchanged when None). Later passes over
    the layer then see the pruned function before the layer is physically shrunk.
    """
    w = weight_matrix(layer.get_submodule(writer))  # [out, in] view
    kept = kept_cols.to(w.device)
    new = w[:, kept].clone() if new_kept is None else new_kept.to(device=w.device, dtype=w.dtype)
    w.zero_()
    w[:, kept] = new


@torch.no_grad()
def permute_units(layer: nn.Module, layout: UnitLayout, perm: torch.Tensor) -> None:
    """Reorder one kind of unit inside ``layer``, in place: unit ``perm[p]`` moves to slot ``p``
    in every run of features that belongs to the units (the MLP's gate/up rows and biases and
    the writer's columns), so the layer computes exactly what it did.

    Args:
        layout: the units' layout (``families``); ``perm`` a permutation of ``range(layout.count)``.
        perm: ``LongTensor [count]``.
    """
    if perm.shape != (layout.count,) or not torch.equal(perm.sort().values.cpu(), torch.arange(layout.count)):
        raise ValueError(f"perm must be a permutation of range({layout.count}), got shape {tuple(perm.shape)}")
    for cut in layout.cuts:
        module = layer.get_submodule(cut.module)
        dim = weight_dim(module, cut.side)
        cols = unit_columns(perm.cpu(), layout.width, cut.offset).to(module.weight.device)  # [count * width]
        span = slice(cut.offset, cut.offset + cols.numel())
        w = module.weight
        if dim == 0:
            w[span] = w.index_select(0, cols)
        else:
            w[:, span] = w.index_select(1, cols)
        if cut.side == "out" and getattr(module, "bias", None) is not None:
            module.bias[span] = module.bias.index_select(0, cols.to(module.bias.device))


def _keep_indices(
    layer: nn.Module, kept: Mapping[str, tuple[UnitLayout, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """``(module, side) -> LongTensor`` of the features that stay, from the kept units of each kind."""
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for layout, units in kept.values():
        removed = removed_from(units, layout.count)
        for cut in layout.cuts:
            module = layer.get_submodule(cut.module)
            size = module.weight.shape[weight_dim(module, cut.side)]
            mask = masks.setdefault((cut.module, cut.side), torch.ones(size, dtype=torch.bool))
            mask[unit_columns(removed, layout.width, cut.offset)] = False
    return {key: mask.nonzero().flatten() for key, mask in masks.items()}


def _load_into_empty(new: nn.Module, state: dict[str, torch.Tensor], old: nn.Module) -> nn.Module:
    """Fill a module built on the meta device: ``state`` (assigned, not copied), zero biases the
    new config adds, and the old module's non-persistent buffers (rotary tables...)."""
    like = next(iter(state.values()))
    for key, tensor in new.state_dict().items():
        if key not in state and key.endswith("bias"):
            state[key] = torch.zeros(tensor.shape, dtype=like.dtype, device=like.device)
    new.load_state_dict(state, strict=True, assign=True)
    old_buffers = dict(old.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta and name in old_buffers:
            owner, _, attr = name.rpartition(".")
            setattr(new.get_submodule(owner) if owner else new, attr, old_buffers[name])
    new.train(old.training)
    return new


@torch.no_grad()
def shrink_layer(
    layer: nn.Module,
    kept: Mapping[str, tuple[UnitLayout, torch.Tensor]],
    biases: Mapping[str, torch.Tensor],
    config: Any,
    layer_idx: int,
) -> nn.Module:
    """A new decoder layer built from ``config`` holding only the kept units of ``layer``.

    Args:
        layer: the decoder layer (its writers already compensated by :func:`set_writer_columns`).
        kept: kind -> (layout, kept unit indices); kinds not listed keep every unit.
        biases: writer module path -> ``[out]`` bias to add (bias compensation).
        config: the shrunk model's config (sizes of the new layer).
        layer_idx: the new layer's index (KV cache slot).

    Returns:
        The new layer (the weights are slices of the old ones; the old layer is left as is).
    """
    state = dict(layer.state_dict())
    for (path, side), index in _keep_indices(layer, kept).items():
        module = layer.get_submodule(path)
        weight = state[f"{path}.weight"]
        state[f"{path}.weight"] = weight.index_select(weight_dim(module, side), index.to(weight.device))
        if side == "out" and f"{path}.bias" in state:
            state[f"{path}.bias"] = state[f"{path}.bias"].index_select(0, index.to(weight.device))
    for path, bias in biases.items():
        key, like = f"{path}.bias", state[f"{path}.weight"]
        old = state.get(key)
        state[key] = bias.to(device=like.device, dtype=like.dtype) + (0 if old is None else old)
    with torch.device("meta"):
        new = type(layer)(config, layer_idx=layer_idx)
    return _load_into_empty(new, state, layer)


def replace_layer(model: nn.Module, layers_path: str, index: int, new: nn.Module) -> None:
    """Put ``new`` in place of decoder layer ``index``."""
    model.get_submodule(layers_path)[index] = new  # type: ignore[index]


def rebuild_model(model: nn.Module, config: Any, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The model plain transformers builds from ``config``, holding ``state`` (default: the
    model's own tensors), without copying them.

    Used after layers were dropped or shrunk: the in-memory model is then exactly what
    ``AutoModelForCausalLM.from_pretrained`` will build from the saved folder.
    """
    from transformers import AutoModelForCausalLM

    state = dict(model.state_dict()) if state is None else state
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(
            config, attn_implementation=model.config._attn_implementation
        )
    new = _load_into_empty(new, state, model)
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    return new


def without_layers(model: nn.Module, layers_path: str, kept: list[int], config: Any) -> nn.Module:
    """The model with only the decoder layers ``kept`` (renumbered 0..), rebuilt from ``config``."""
    prefix = layers_path + "."
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, _, rest = key[len(prefix):].partition(".")
        if int(index) in renumber:
            state[f"{prefix}{renumber[int(index)]}.{rest}"] = tensor
    return rebuild_model(model, config, state)


@contextmanager
def output_biases(layer: nn.Module, paths: Iterable[str], biases: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While active, add ``biases[path]`` to the output of each submodule ``path`` of ``layer``.

    The mapping is read at every call, so entries added inside the block take effect at once:
    a later pass over the layer (the MLP's statistics after its attention was pruned) sees the
    bias compensation before the layer is rebuilt with real biases.
    """

    def hook_for(path: str) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            bias = biases.get(path)
            return output if bias is None else output + bias.to(dtype=output.dtype, device=output.device)

        return hook

    handles = [layer.get_submodule(p).register_forward_hook(hook_for(p)) for p in paths]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
