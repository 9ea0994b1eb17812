"""Checks that a checkpoint folder on disk is whole and fits its own config, before any weight loads.

A truncated or garbled safetensors file, a ``config.json`` that is not JSON, or a config whose
sizes disagree with the stored tensors would otherwise surface deep inside transformers or torch
as a traceback without the file's name (or, for a config with more layers than the weights, as a
silently random-initialised model). Each check here reads headers only (no tensor data) and raises
one :class:`~prunescope.errors.PrunescopeError` naming the file, the tensor and what was expected.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunescope.errors import PrunescopeError, first_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
Shapes = dict[str, tuple[int, ...]]


def read_config(folder: str | Path) -> "PretrainedConfig":
    """``AutoConfig`` of a local model folder; a missing, unreadable or unknown config is one
    error naming ``config.json``."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrunescopeError(
            f"{path} cannot be read as a model config ({first_line(exc)}); expected the JSON that "
            "save_pretrained writes, with a model_type transformers knows"
        ) from exc


def safetensors_shapes(path: Path) -> Shapes:
    """Tensor name -> shape from the header of one safetensors file (no data read).

    safetensors itself checks that the header length fits the file, that the header is JSON and
    that the tensors' byte ranges cover the data exactly: a truncated file fails here.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise PrunescopeError(
            f"{path} is truncated or damaged (safetensors: {first_line(exc)}); expected a whole "
            "safetensors file (8-byte header length, JSON header, every tensor's bytes): save or "
            "download it again"
        ) from exc


def folder_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (file path, shape) of a Hugging Face safetensors folder (one file or shards
    with ``model.safetensors.index.json``); empty for a folder without safetensors weights."""
    index = folder / SHARD_INDEX
    if index.is_file():
        files = sorted(set(_weight_map(index).values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        return {}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise PrunescopeError(f"{index} names the shard {name}, which is missing from {folder}")
        found.update({key: (str(path), shape) for key, shape in safetensors_shapes(path).items()})
    return found


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked to map names to plain file names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PrunescopeError(
            f"{index} is not a safetensors shard index ({first_line(exc)}); expected JSON with a "
            "'weight_map' object from tensor name to shard file"
        ) from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and Path(f).name == f for f in weight_map.values()
    ):
        raise PrunescopeError(f"{index}: 'weight_map' must map tensor names to shard file names in the folder")
    return weight_map


@dataclass(frozen=True)
class ModelShapes:
    """What a config builds: every parameter name with its shape (tied names each), the groups of
    names that are one tied tensor (any one of them stored is enough), and regexes of names a
    checkpoint may lack."""

    shapes: Shapes
    groups: tuple[tuple[str, ...], ...]
    optional: tuple[str, ...] = ()


def expected_shapes(config: "PretrainedConfig") -> ModelShapes:
    """The parameters of the causal LM ``config`` describes, built on the ``meta`` device (no
    memory, no weights initialised)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes: Shapes = {}
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(param.shape)
        groups.setdefault(id(param), []).append(name)
    optional = tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    return ModelShapes(shapes, tuple(tuple(g) for g in groups.values()), optional)


def check_fit(
    expected: ModelShapes, found: Mapping[str, tuple[str, tuple[int, ...]]],
    config: "PretrainedConfig", config_path: Path, exact_names: bool = False,
) -> None:
    """Raise when a stored tensor's shape differs from what the config builds, or when the model
    needs tensors no file holds.

    Args:
        expected: what the model ``config`` builds (:func:`expected_shapes`).
        found: stored name -> (file, shape).
        config: the config (its size fields name the likely culprit).
        config_path: the ``config.json`` the sizes come from.
        exact_names: the files use the model's own parameter names (a prunescope sparse
            checkpoint), so every parameter must be there. Otherwise (a Hugging Face folder, whose
            names transformers may rename on load, e.g. GPT-NeoX's ``embed_out``) only whole
            decoder layers are looked for: layer indices survive any renaming.
    """
    _check_shapes(expected, found, config, config_path)
    missing = _missing(expected, found) if exact_names else _missing_layers(expected, found)
    if missing:
        files = sorted({file for file, _shape in found.values()})
        raise PrunescopeError(
            f"{', '.join(files[:3])} lack(s) {len(missing)} tensor(s) that {config_path} describes, "
            f"e.g. {missing[0]!r} with shape {list(expected.shapes[missing[0]])} "
            f"(num_hidden_layers={getattr(config, 'num_hidden_layers', '?')}): the weights are "
            "incomplete, or the config does not belong to them"
        )


def _check_shapes(
    expected: ModelShapes, found: Mapping[str, tuple[str, tuple[int, ...]]],
    config: "PretrainedConfig", config_path: Path,
) -> None:
    """Raise for the first stored tensor whose shape is not the one the config builds."""
    for name, shape in expected.shapes.items():
        key = _stored_key(name, found)
        if key is not None and found[key][1] != shape:
            stored = found[key][1]
            raise PrunescopeError(
                f"{found[key][0]}: tensor {key!r} has shape {list(stored)} but {config_path} "
                f"({_size_fields(config, shape, stored)}) builds {list(shape)}; "
                "the config does not belong to these weights"
            )


def _missing(expected: ModelShapes, found: Mapping[str, Any]) -> list[str]:
    """One name of every tied group of parameters none of whose names is stored."""
    def optional(name: str) -> bool:
        return any(re.search(p, name) for p in expected.optional)

    return [group[0] for group in expected.groups
            if not any(_stored_key(n, found) is not None or optional(n) for n in group)]


def _missing_layers(expected: ModelShapes, found: Mapping[str, Any]) -> list[str]:
    """The parameters of decoder layers the config builds and no stored tensor belongs to."""
    stored = {_layer_of(key) for key in found} - {None}
    if not stored:  # no layer-numbered names at all: nothing to compare by
        return []
    return [name for name in expected.shapes if (layer := _layer_of(name)) is not None and layer not in stored]


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    match = _LAYER.search("." + name)
    return int(match.group(1)) if match else None


def check_model_folder(folder: Path) -> "PretrainedConfig":
    """Check a local Hugging Face model folder and return its config: config readable, every
    safetensors file whole, and the stored shapes those the config builds. Folders with ``.bin``
    weights only get the config check."""
    config = read_config(folder)
    found = folder_shapes(folder)
    if not found:
        return config
    try:
        expected = expected_shapes(config)
    except ValueError as exc:  # not a causal LM transformers builds: from_pretrained says why
        log.debug("shape check of %s skipped: %s", folder, first_line(exc))
        return config
    check_fit(expected, found, config, folder / "config.json")
    return config


def _stored_key(name: str, found: Mapping[str, Any]) -> str | None:
    """The stored key of parameter ``name``: itself, or without its first component (a base
    model saved without the ``model.`` prefix)."""
    if name in found:
        return name
    short = name.split(".", 1)[-1]
    return short if short in found else None


def _size_fields(config: "PretrainedConfig", expected: tuple[int, ...], stored: tuple[int, ...]) -> str:
    """The config's size fields equal to a dimension the stored shape lacks (the likely edited
    ones), else its hidden size."""
    differing = {d for d in expected if d not in stored}
    fields = [
        f"{key}={value}" for key, value in sorted(config.to_dict().items())
        if isinstance(value, int) and not isinstance(value, bool) and value in differing
    ]
    return ", ".join(fields[:4]) or f"hidden_size={getattr(config, 'hidden_size', '?')}"
