"""Read PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Each adapted module becomes a :class:`LoraBlock` holding its two factors as 2-D matrices
``B [out, r]`` and ``A [r, in]`` and PEFT's scale, so that ``ΔW = scale * B @ A`` exactly as PEFT
defines it (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern``
and ``alpha_pattern`` resolved per module with PEFT's own suffix-regex rule).

- Linear: ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``. With ``fan_in_fan_out`` PEFT
  transposes ΔW to match the base weight; the factors and the spectrum are the same.
- Embedding: ``lora_embedding_A [r, num_embeddings]``, ``lora_embedding_B [dim, r]``; the base
  weight gets ``(B @ A)^T`` (same singular values).
- Conv: ``lora_A [r, in, *kernel]``, ``lora_B [out, r, 1, 1]`` (a 1x1 conv); the kernel is
  flattened so ``A`` becomes ``[r, in * prod(kernel)]``.

Nothing here forms ΔW.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# key suffix -> (factor, kind)
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.weight", "A", "linear"),
    (".lora_B.weight", "B", "linear"),
    (".lora_embedding_A", "A", "embedding"),
    (".lora_embedding_B", "B", "embedding"),
)
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_BASE_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")


@dataclass(frozen=True)
class LoraBlock:
    """One adapted module: ``ΔW = scale * B @ A`` with ``B [out, r]``, ``A [r, in]``.

    ``kind`` is ``linear``, ``embedding`` or ``conv``; ``a_shape`` keeps A's stored shape (conv
    kernels) so a re-compressed A can be written back in PEFT's layout.
    """

    name: str
    layer: int | None
    module_type: str
    kind: str
    rank: int
    alpha: float
    scale: float
    A: torch.Tensor = field(repr=False)
    B: torch.Tensor = field(repr=False)
    a_key: str = ""
    b_key: str = ""
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ΔW as ``(out, in)`` (``in`` includes a flattened conv kernel)."""
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def parameters(self) -> int:
        """Number of LoRA parameters (A and B)."""
        return int(self.A.numel() + self.B.numel())


@dataclass(frozen=True)
class Adapter:
    """A loaded PEFT LoRA adapter: its folder, raw config, blocks, and any other stored tensors."""

    path: Path
    config: Mapping[str, Any] = field(repr=False)
    blocks: tuple[LoraBlock, ...] = field(repr=False)
    extra: Mapping[str, torch.Tensor] = field(repr=False, default_factory=dict)
    notes: tuple[str, ...] = ()
    weight_file: str = ""

    @property
    def name(self) -> str:
        return self.path.name


def is_adapter_dir(path: Path) -> bool:
    """True if ``path`` is a folder with an ``adapter_config.json``."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def find_adapters(paths: Sequence[str | Path]) -> list[Path]:
    """Expand the user's paths: an adapter folder stays, a folder of adapter folders is expanded.

    Anything else is kept as is so that :func:`load_adapter` reports it with a clear message.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and not is_adapter_dir(path):
            children = sorted(p for p in path.iterdir() if is_adapter_dir(p))
            if children:
                found.extend(children)
                continue
        found.append(path)
    return found


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key ``k`` whose regex
    ``(.*\\.)?(k)$`` matches the module name wins; otherwise ``default``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


def peft_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_FILE
    if not folder.exists():
        raise PrunescopeError(f"adapter path {folder} does not exist; pass a PEFT adapter folder")
    if not is_adapter_dir(folder):
        raise PrunescopeError(
            f"{folder} is not a PEFT adapter: no {CONFIG_FILE}; pass a folder written by "
            "PeftModel.save_pretrained (or a folder of such folders)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunescopeError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PrunescopeError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise PrunescopeError(f"{cfg_path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise PrunescopeError(f"{cfg_path}: key 'r' must be a positive integer, got {r!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise PrunescopeError(f"{cfg_path}: key {key!r} must be an object, got {value!r}")
        for pat, v in value.items():
            if key == "rank_pattern" and (not isinstance(v, int) or v <= 0):
                raise PrunescopeError(f"{cfg_path}: rank_pattern[{pat!r}] must be a positive integer, got {v!r}")
    return config


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    for fname in WEIGHT_FILES:
        path = folder / fname
        if not path.is_file():
            continue
        try:
            if fname.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path)), fname
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors/pickle raise many types for a corrupt file
            raise PrunescopeError(f"cannot read adapter weights {path}: {exc.__class__.__name__}: {exc}") from exc
        if not isinstance(state, dict):
            raise PrunescopeError(f"{path} does not hold a state dict of tensors")
        return state, fname
    raise PrunescopeError(
        f"{folder} has {CONFIG_FILE} but no weights: expected one of {', '.join(WEIGHT_FILES)}"
    )


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(module_name, factor, kind)`` of a LoRA factor key, or None for other tensors."""
    for suffix, factor, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], factor, kind
    return None


def module_name(key_prefix: str) -> str:
    """Module name as PEFT's patterns see it: without ``base_model.model.``."""
    return key_prefix[len(_PREFIX):] if key_prefix.startswith(_PREFIX) else key_prefix


def _as_matrices(a: torch.Tensor, b: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Flatten conv factors to ``A [r, in*k]``, ``B [out, r]``; check that they multiply."""
    kind = "linear"
    if a.dim() > 2 or b.dim() > 2:
        kind = "conv"
        if b.dim() > 2 and any(s != 1 for s in b.shape[2:]):
            raise PrunescopeError(f"{where}: conv lora_B must be a 1x1 kernel, got shape {tuple(b.shape)}")
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.dim() != 2 or b.dim() != 2:
        raise PrunescopeError(f"{where}: LoRA factors must be matrices, got A {tuple(a.shape)} and B {tuple(b.shape)}")
    if b.shape[1] != a.shape[0]:
        raise PrunescopeError(
            f"{where}: shapes do not multiply: B {tuple(b.shape)} @ A {tuple(a.shape)}; "
            "B must be [out, r] and A [r, in]"
        )
    return a, b, kind


def _make_block(
    prefix: str, a_key: str, b_key: str, state: Mapping[str, torch.Tensor], kind: str,
    config: Mapping[str, Any], where: Path,
) -> LoraBlock:
    a_raw, b_raw = state[a_key], state[b_key]
    for key, t in ((a_key, a_raw), (b_key, b_raw)):
        if not torch.is_floating_point(t):
            raise PrunescopeError(f"{where}: tensor {key!r} has dtype {t.dtype}; expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise PrunescopeError(f"{where}: tensor {key!r} contains NaN or inf values")
    a, b, matrix_kind = _as_matrices(a_raw, b_raw, f"{where}: {prefix}")
    kind = "conv" if matrix_kind == "conv" else kind
    name = module_name(prefix)
    rank = int(a.shape[0])
    expected = int(pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
    if rank == 0:
        raise PrunescopeError(f"{where}: {a_key!r} has rank 0 (shape {tuple(a_raw.shape)}); r must be >= 1")
    if rank != expected:
        raise PrunescopeError(
            f"{where}: {a_key!r} has rank {rank} but adapter_config.json gives r={expected} for {name} "
            "(r / rank_pattern); the scale alpha/r would be wrong"
        )
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    scale = peft_scale(alpha, rank, bool(config.get("use_rslora", False)))
    match = _LAYER_RE.search("." + name + ".")
    return LoraBlock(
        name=name, layer=int(match.group(1)) if match else None, module_type=name.rsplit(".", 1)[-1],
        kind=kind, rank=rank, alpha=alpha, scale=scale, A=a, B=b, a_key=a_key, b_key=b_key,
        a_shape=tuple(a_raw.shape), b_shape=tuple(b_raw.shape),
    )


def _notes(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    notes = []
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in state):
        notes.append(
            "DoRA adapter: the spectra are those of B @ A; the real update ΔW also rescales each "
            "column by a learned magnitude and needs the base model"
        )
    init = str(config.get("init_lora_weights", "")).lower()
    if any(init.startswith(p) for p in _BASE_INIT):
        notes.append(
            f"init_lora_weights={config.get('init_lora_weights')!r}: the base weight was modified at "
            "initialisation, so the real ΔW needs the base model; the spectra are those of scale * B @ A"
        )
    return tuple(notes)


def load_adapter(path: str | Path) -> Adapter:
    """Read one PEFT LoRA adapter folder into an :class:`Adapter` (no ΔW formed).

    Raises:
        PrunescopeError: not an adapter folder, unreadable files, a lora_A without its lora_B (or
            the reverse), shapes that do not multiply, r = 0 or a rank that contradicts the
            config, NaN/inf values. The message names the file and the key.
    """
    folder = Path(path).expanduser()
    config = _read_config(folder)
    state, fname = _read_weights(folder)
    where = folder / fname
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    for key in state:
        split = _split_key(key)
        if split is None:
            extra[key] = state[key]
            continue
        prefix, factor, kind = split
        factors.setdefault(prefix, {})[factor] = key
        kinds[prefix] = kind
    blocks = []
    for prefix in sorted(factors, key=_natural_key):
        pair = factors[prefix]
        if "A" not in pair or "B" not in pair:
            have, miss = ("A", "B") if "A" in pair else ("B", "A")
            raise PrunescopeError(f"{where}: {pair[have]!r} has no matching lora_{miss} for module {prefix}")
        blocks.append(_make_block(prefix, pair["A"], pair["B"], state, kinds[prefix], config, where))
    if not blocks:
        raise PrunescopeError(f"{where} holds no LoRA factors (no keys ending in lora_A.weight / lora_B.weight)")
    return Adapter(path=folder, config=config, blocks=tuple(blocks), extra=extra,
                   notes=_notes(config, state), weight_file=fname)


def _natural_key(text: str) -> list[Any]:
    """Sort ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
