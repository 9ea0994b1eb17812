"""Compressed sparse checkpoints: a safetensors file with a bitmask layout for sparse tensors.

Layout of a checkpoint folder (format version 1)::

    sparse_model.safetensors   the tensors (see below)
    config.json                the model config (when saved from a model with ``.config``)
    generation_config.json     when the model has one
    tokenizer files            when a tokenizer is given
    prunescope_sparse.json     the index, written LAST: a folder without it never loads

A tensor ``W`` whose bitmask layout is smaller than its dense bytes is stored as two entries:

* ``W.__values``  -- 1-D, same dtype as ``W``: the kept entries in row-major (C) order;
* ``W.__bitmask`` -- uint8, ``ceil(numel / 8)`` bytes: the keep-mask, bit-packed;
* ``W.__signs``   -- only when some dropped zero of a float tensor is ``-0.0``: uint8,
  ``ceil((numel - nnz) / 8)`` bytes, one bit per dropped entry (in row-major order), set where
  that zero is ``-0.0``.

Every other tensor is stored under its own name, unchanged. A tensor that is the very same view
of the same storage as an earlier one (tied weights: ``lm_head.weight`` is ``embed_tokens.weight``
in SmolLM2) is stored once and recorded as an alias.

**Which entries are kept, and -0.0.** An entry is kept when ``value != 0``: every NaN, inf and
subnormal is kept as a value. Zeros are dropped, and both zeros come back bit for bit: ``+0.0``
needs nothing, ``-0.0`` sets its bit in ``W.__signs``. This matters in practice: pruning by
multiplying with a mask (``torch.nn.utils.prune``, ``prunescope.prune``: ``w * mask``) turns every
pruned negative weight into ``-0.0``, about half the zeros. Keeping those as values would store
75% of the entries at 50% sparsity; the sign bits cost one bit per dropped entry instead
(float32 at 50%: 0.5 + 1/32 + 1/64 = 0.547 of dense, against 0.531 when the zeros are
``+0.0``, as ``apply.apply_masks``'s ``masked_fill`` writes them). The round trip is bit-exact
for every supported dtype.

**Bit order.** Entry ``i`` of the flattened tensor is bit ``i % 8`` (least significant bit first)
of byte ``i // 8``, the same as ``numpy.packbits(..., bitorder="little")``. Padding bits of the
last byte are zero (a loader rejects a file where they are not).

**Metadata.** The safetensors header's ``__metadata__`` (string -> string) holds
``prunescope.format`` (``"prunescope-sparse"``), ``prunescope.format_version`` (``"1"``) and, per
tensor, ``tensor:<name>`` -> JSON ``{"v": 1, "i": position in the state dict, "layout":
"bitmask"|"dense"|"alias", "shape": [...], "dtype": "float32", "nnz": ..., "alias_of": ...}``
(safetensors does not keep the metadata's order, hence ``"i"``).

**Atomic writes** (:mod:`prunescope.atomic`). Everything is written into a temporary folder next to the target and fsynced;
the index goes last; then the folder is renamed onto the target (a previous checkpoint there is
moved aside first and deleted only after the rename succeeded). An interrupted save leaves at most
a hidden ``.NAME.tmp-*`` folder without an index, which never loads, and never a half-written
target.

**Sizes.** Stored bytes of a bitmask tensor are ``nnz * itemsize + ceil(numel / 8)`` (+
``ceil((numel - nnz) / 8)`` when it has ``-0.0`` zeros); at 50% density in float32 that is
0.5 + 1/32 = 0.53125 of the dense bytes (0.546875 with negative zeros). The size of the dense
safetensors file that the same state dict would make (``save_pretrained``-style: tied tensors once,
metadata ``{"format": "pt"}``) is *computed* from the tensors' sizes and the exact header
safetensors would write (same JSON, same tensor order, same 8-byte padding), not by writing it;
tests check the computation against real ``safetensors.torch.save`` output byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import atomic
from prunescope.errors import PrunescopeError, joined_lines

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT_NAME = "prunescope-sparse"
FORMAT_VERSION = 1
WEIGHTS_FILE = "sparse_model.safetensors"
INDEX_FILE = "prunescope_sparse.json"
VALUES_SUFFIX = ".__values"
BITMASK_SUFFIX = ".__bitmask"
SIGNS_SUFFIX = ".__signs"
_META_PREFIX = "tensor:"
_DENSE_METHOD = (
    "computed: tensor bytes + the exact header safetensors writes for the dense state dict "
    "(tied tensors once, metadata {'format': 'pt'}); not written to disk"
)

# Dtypes the bitmask layout supports, with the integer type of the same width (to compare bits).
_BITS_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.int64: torch.int64,
    torch.int32: torch.int32,
    torch.int16: torch.int16,
    torch.int8: torch.int8,
    torch.uint8: torch.uint8,
    torch.bool: torch.uint8,
}

# safetensors' dtype names, listed in the order of its Dtype enum; the file sorts tensors by this
# order (descending), then by name. Needed to reproduce the dense file's header exactly.
_ST_DTYPES: tuple[tuple[torch.dtype | None, str], ...] = (
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (getattr(torch, "float8_e5m2", None), "F8_E5M2"),
    (getattr(torch, "float8_e4m3fn", None), "F8_E4M3"),
    (torch.int16, "I16"),
    (getattr(torch, "uint16", None), "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (getattr(torch, "uint32", None), "U32"),
    (torch.float32, "F32"),
    (torch.complex64, "C64"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (getattr(torch, "uint64", None), "U64"),
)
_ST_NAME = {dt: name for dt, name in _ST_DTYPES if dt is not None}
SAFETENSORS_DTYPE_NAMES = _ST_NAME  # torch dtype -> the name a safetensors header uses
_ST_RANK = {dt: rank for rank, (dt, _) in enumerate(_ST_DTYPES) if dt is not None}

_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit k of a byte holds entry 8 * byte + k


@dataclass(frozen=True)
class TensorStats:
    """How one tensor of the state dict was stored.

    Attributes:
        name: state-dict key.
        dtype: e.g. ``"float32"``.
        shape: the tensor's shape.
        layout: ``"bitmask"`` (values + packed mask), ``"dense"`` (as is) or ``"alias"`` (tied to
            ``alias_of``, stored once under that name).
        density: fraction of entries ``!= 0`` (the entries a bitmask keeps; NaN counts, -0.0
            does not).
        stored_bytes: bytes this tensor adds to the data section of the file (0 for an alias).
        dense_bytes: ``numel * itemsize``.
        alias_of: the name the data is stored under, for ``layout == "alias"``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    density: float
    stored_bytes: int
    dense_bytes: int
    alias_of: str | None = None


@dataclass(frozen=True)
class SparseCheckpointInfo:
    """What :func:`save_sparse` wrote; also stored in the checkpoint's index.

    Attributes:
        path: the checkpoint folder.
        weights_file: name of the safetensors file inside it.
        format_version: layout version (see the module docstring).
        file_bytes: size of the sparse safetensors file.
        dense_file_bytes: size of the plain dense safetensors file of the same state dict.
        dense_file_bytes_method: how ``dense_file_bytes`` was obtained (computed, not written).
        size_ratio: ``file_bytes / dense_file_bytes``.
        sparse_tensors: tensors stored with the bitmask layout.
        dense_tensors: tensors stored as they are.
        config_saved: whether ``config.json`` was written.
        tokenizer_saved: whether tokenizer files were written.
        save_seconds: wall time of the save.
        tensors: per-tensor statistics, in state-dict order.
    """

    path: Path
    weights_file: str
    format_version: int
    file_bytes: int
    dense_file_bytes: int
    dense_file_bytes_method: str
    size_ratio: float
    sparse_tensors: int
    dense_tensors: int
    config_saved: bool
    tokenizer_saved: bool
    save_seconds: float
    tensors: tuple[TensorStats, ...]


# --------------------------------------------------------------------------- bit packing


def keep_mask(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like ``t``: the entries the bitmask layout stores as values.

    ``value != 0``: NaN, inf and subnormals are kept; ``+0.0`` and ``-0.0`` are dropped (the sign
    of a dropped zero goes to the sign bits, see :func:`negative_zeros`).
    """
    return t != 0


def negative_zeros(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor shaped like ``t``: True where the entry is ``-0.0`` (always False for ints)."""
    if not t.is_floating_point():
        return torch.zeros_like(t, dtype=torch.bool)
    return (t == 0) & torch.signbit(t)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, least significant bit first.

    Args:
        mask: bool tensor of any shape; flattened in row-major order.

    Returns:
        uint8 tensor of shape ``[ceil(numel / 8)]``; entry ``i`` is bit ``i % 8`` of byte ``i // 8``;
        padding bits are zero.
    """
    flat = mask.reshape(-1).contiguous().view(torch.uint8)  # [n] of 0/1, no copy
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])  # [n + pad]
    groups = flat.view(-1, 8)  # [nbytes, 8]
    packed = groups[:, 0].clone()  # [nbytes]
    for k in range(1, 8):
        packed |= groups[:, k] << k
    return packed


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits of ``packed`` as a 1-D bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS).bitwise_and_(1)  # [nbytes, 8] of 0/1
    return bits.view(torch.bool).reshape(-1)[:numel]  # [numel]


def bitmask_bytes(numel: int, nnz: int, itemsize: int, signs: bool = False) -> int:
    """Stored bytes of the bitmask layout: the kept values plus ``ceil(numel / 8)`` mask bytes,
    plus ``ceil((numel - nnz) / 8)`` sign bytes when some dropped zero is ``-0.0``."""
    return nnz * itemsize + (numel + 7) // 8 + ((numel - nnz + 7) // 8 if signs else 0)


# --------------------------------------------------------------------------- saving


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PrunescopeError(f"{where}: unknown dtype {name!r} in the metadata")
    return dtype


def _state_dict_of(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(state dict, config or None)`` from a module or a mapping of tensors."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), getattr(obj, "config", None)
    if isinstance(obj, Mapping):
        return dict(obj), None
    raise PrunescopeError(
        f"save_sparse needs a torch.nn.Module or a mapping of name -> tensor, got {type(obj).__name__}"
    )


def _check_tensors(state: Mapping[str, torch.Tensor]) -> None:
    """Reject entries the format cannot hold, naming the key."""
    for name, t in state.items():
        if not isinstance(name, str) or not name:
            raise PrunescopeError(f"state-dict keys must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise PrunescopeError(f"state-dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if name.endswith((VALUES_SUFFIX, BITMASK_SUFFIX, SIGNS_SUFFIX)):
            raise PrunescopeError(
                f"tensor name {name!r} ends with {VALUES_SUFFIX!r}, {BITMASK_SUFFIX!r} or "
                f"{SIGNS_SUFFIX!r}, which the sparse format reserves for its own entries; rename it"
            )
        if t.is_meta or t.dtype not in _ST_NAME:
            raise PrunescopeError(
                f"tensor {name!r} ({_dtype_name(t.dtype)}, device {t.device}) cannot be saved: "
                f"need real data with a dtype in {sorted(_dtype_name(d) for d in _ST_NAME)}"
            )


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a view: same storage, offset, shape, stride and dtype means the same tensor."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _find_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> first name with the very same view (tied weights); empty tensors never alias."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = _view_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _encode(name: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any], TensorStats]:
    """Choose the smaller layout for one tensor: ``(file entries, metadata, stats)``."""
    t = t.detach().cpu().contiguous()
    numel, itemsize = t.numel(), t.element_size()
    dense = numel * itemsize
    meta: dict[str, Any] = {"v": FORMAT_VERSION, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    flat = t.reshape(-1)  # [numel]
    nnz = int(torch.count_nonzero(flat)) if t.dtype in _BITS_VIEW else numel
    density = nnz / numel if numel else 1.0
    entries, signs = None, False
    if bitmask_bytes(numel, nnz, itemsize) < dense:  # worth looking at the zeros' signs
        entries, signs = _bitmask_entries(name, flat)
        if signs and bitmask_bytes(numel, nnz, itemsize, signs=True) >= dense:
            entries = None
    if entries is not None:
        stored = bitmask_bytes(numel, nnz, itemsize, signs)
        meta.update(layout="bitmask", nnz=nnz, signs=signs)
    else:
        entries = {name: t}
        stored = dense
        meta.update(layout="dense")
    stats = TensorStats(name, meta["dtype"], tuple(t.shape), meta["layout"], density, stored, dense)
    return entries, meta, stats


def _bitmask_entries(name: str, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
    """The bitmask layout's file entries for a 1-D tensor, and whether it needed sign bits."""
    mask = keep_mask(flat)  # [numel]
    entries = {name + VALUES_SUFFIX: flat[mask], name + BITMASK_SUFFIX: pack_bits(mask)}  # [nnz], [numel/8]
    if not flat.is_floating_point():
        return entries, False
    # -0.0 has nonzero bits but compares equal to 0: count both ways before gathering anything.
    nonzero_bits = torch.count_nonzero(flat.view(_BITS_VIEW[flat.dtype]))
    if int(nonzero_bits) == entries[name + VALUES_SUFFIX].numel():
        return entries, False
    dropped_signs = torch.signbit(flat[~mask])  # [numel - nnz]: True for -0.0
    entries[name + SIGNS_SUFFIX] = pack_bits(dropped_signs)  # [ceil((numel - nnz) / 8)]
    return entries, True


def _alias_entry(
    name: str, t: torch.Tensor, target: str, target_stats: TensorStats
) -> tuple[dict[str, Any], TensorStats]:
    """Metadata and stats of a tensor stored only as a reference to ``target`` (tied weights)."""
    meta = {"v": FORMAT_VERSION, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
            "layout": "alias", "alias_of": target}
    stats = TensorStats(name, meta["dtype"], tuple(t.shape), "alias", target_stats.density, 0,
                        t.numel() * t.element_size(), alias_of=target)
    return meta, stats


def _unshare(entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone dense entries that share storage with another entry (safetensors refuses those)."""
    seen: set[int] = set()
    out = {}
    for key, t in entries.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def dense_safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Exact size of the file ``safetensors.torch.save_file(tensors, metadata=metadata)`` writes.

    8 bytes of header length + the JSON header (tensors sorted by dtype, descending in
    safetensors' dtype order, then by name; padded with spaces to a multiple of 8) + the raw data.
    Aliased tensors must already be removed (safetensors refuses shared storage).
    """
    order = sorted(tensors, key=lambda n: (-_ST_RANK[tensors[n].dtype], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8 + offset


def _check_target(folder: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or an earlier sparse checkpoint."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise PrunescopeError(f"checkpoint target {folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    if not (folder / INDEX_FILE).is_file():
        raise PrunescopeError(
            f"checkpoint target {folder} is a non-empty folder that is not a prunescope sparse "
            f"checkpoint (no {INDEX_FILE}); pass an empty or new folder"
        )
    if not overwrite:
        raise PrunescopeError(f"checkpoint {folder} already exists; pass overwrite=True to replace it")


def _write_weights(state: Mapping[str, torch.Tensor], path: Path) -> tuple[list[TensorStats], int, int]:
    """Encode and write the safetensors file; returns (stats, dense file bytes, sparse tensors)."""
    from safetensors.torch import save_file

    aliases = _find_aliases(state)
    entries: dict[str, torch.Tensor] = {}
    metadata = {"prunescope.format": FORMAT_NAME, "prunescope.format_version": str(FORMAT_VERSION)}
    stats: dict[str, TensorStats] = {}
    dense_view: dict[str, torch.Tensor] = {}
    for i, (name, t) in enumerate(
        tqdm(state.items(), desc="encode sparse", unit="tensor", leave=False, disable=None)
    ):
        if name in aliases:
            meta, stats[name] = _alias_entry(name, t, aliases[name], stats[aliases[name]])
        else:
            new, meta, stats[name] = _encode(name, t)
            entries.update(new)
            dense_view[name] = t
        metadata[_META_PREFIX + name] = json.dumps({**meta, "i": i}, separators=(",", ":"))
    save_file(_unshare(entries), str(path), metadata=metadata)
    sparse = sum(s.layout == "bitmask" for s in stats.values())
    return list(stats.values()), dense_safetensors_bytes(dense_view, {"format": "pt"}), sparse


def _write_extras(model_config: Any, generation_config: Any, tokenizer: Any, tmp: Path) -> tuple[bool, bool]:
    """Write config.json (+ generation config) and the tokenizer into ``tmp``."""
    if model_config is not None:
        model_config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return model_config is not None, tokenizer is not None


def _write_index(info: SparseCheckpointInfo, tmp: Path) -> None:
    """Write the index last: its presence marks a complete checkpoint."""
    from prunescope.report.io import to_jsonable

    record = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
              "weights_bytes": info.file_bytes, "info": to_jsonable(info)}
    path = tmp / INDEX_FILE
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


def save_sparse(
    model: nn.Module | Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    overwrite: bool = True,
) -> SparseCheckpointInfo:
    """Write ``model``'s state dict as a compressed sparse checkpoint folder, atomically.

    Args:
        model: a module (its ``state_dict()``; ``model.config`` and ``model.generation_config``
            are saved when present, so :func:`load_sparse_model` can rebuild it) or a plain
            mapping of name -> tensor.
        folder: the checkpoint folder; created, or replaced if it holds an earlier checkpoint.
        tokenizer: saved into the folder when given.
        overwrite: replace an existing checkpoint at ``folder`` (default True).

    Returns:
        :class:`SparseCheckpointInfo` with the file size, the dense file size and per-tensor stats.

    Raises:
        PrunescopeError: an unsupported entry, or a target that is a file / a foreign folder.
    """
    start = time.perf_counter()
    folder = Path(folder)
    state, config = _state_dict_of(model)
    _check_tensors(state)
    _check_target(folder, overwrite)
    with atomic.new_folder(folder) as tmp:
        stats, dense_bytes, sparse = _write_weights(state, tmp / WEIGHTS_FILE)
        generation = getattr(model, "generation_config", None) if isinstance(model, nn.Module) else None
        config_saved, tok_saved = _write_extras(config, generation, tokenizer, tmp)
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        info = SparseCheckpointInfo(
            path=folder, weights_file=WEIGHTS_FILE, format_version=FORMAT_VERSION,
            file_bytes=file_bytes, dense_file_bytes=dense_bytes, dense_file_bytes_method=_DENSE_METHOD,
            size_ratio=file_bytes / dense_bytes, sparse_tensors=sparse,
            dense_tensors=sum(s.layout == "dense" for s in stats),
            config_saved=config_saved, tokenizer_saved=tok_saved,
            save_seconds=time.perf_counter() - start, tensors=tuple(stats),
        )
        _write_index(info, tmp)
    log.info("saved %s: %d bytes, %.3fx the dense file (%d bytes)", folder, file_bytes,
             info.size_ratio, dense_bytes)
    return info


# --------------------------------------------------------------------------- loading


def _read_index(folder: Path) -> dict[str, Any]:
    """Validate the folder and its index; return the index record."""
    if not folder.is_dir():
        raise PrunescopeError(f"sparse checkpoint folder {folder} does not exist or is not a folder")
    index = folder / INDEX_FILE
    if not index.is_file():
        raise PrunescopeError(
            f"{folder} is not a complete prunescope sparse checkpoint: {INDEX_FILE} is missing "
            "(an interrupted save, or a folder written by something else)"
        )
    try:
        record = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrunescopeError(f"{index} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        found = record.get("format") if isinstance(record, dict) else None
        raise PrunescopeError(f"{index} is not a {FORMAT_NAME} index (format={found!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise PrunescopeError(
            f"{index}: unknown format version {record.get('format_version')!r}; this prunescope "
            f"reads version {FORMAT_VERSION}"
        )
    return record


def _weights_path(folder: Path, record: Mapping[str, Any]) -> Path:
    """The weights file named by the index, checked to exist with the recorded size."""
    name = record.get("weights_file")
    if not isinstance(name, str) or Path(name).name != name:
        raise PrunescopeError(f"{folder / INDEX_FILE}: invalid weights_file {name!r}")
    path = folder / name
    if not path.is_file():
        raise PrunescopeError(f"sparse checkpoint {folder}: weights file {name} is missing")
    size = path.stat().st_size
    if size != record.get("weights_bytes"):
        raise PrunescopeError(
            f"{path} has {size} bytes but the index records {record.get('weights_bytes')}: the file "
            "is truncated or was modified after saving"
        )
    return path


def _tensor_meta(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Parse and check the file-level and per-tensor metadata."""
    where = f"{path}"
    if metadata.get("prunescope.format") != FORMAT_NAME:
        raise PrunescopeError(f"{where} is not a {FORMAT_NAME} file (metadata prunescope.format missing)")
    if metadata.get("prunescope.format_version") != str(FORMAT_VERSION):
        raise PrunescopeError(
            f"{where}: unknown format version {metadata.get('prunescope.format_version')!r}; "
            f"this prunescope reads version {FORMAT_VERSION}"
        )
    metas = {}
    for key, value in metadata.items():
        if not key.startswith(_META_PREFIX):
            continue
        name = key[len(_META_PREFIX):]
        try:
            meta = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PrunescopeError(f"{where}: tensor {name!r} has corrupt metadata: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("v") != FORMAT_VERSION:
            raise PrunescopeError(
                f"{where}: tensor {name!r} has unknown format version "
                f"{meta.get('v') if isinstance(meta, dict) else meta!r}; expected {FORMAT_VERSION}"
            )
        if not isinstance(meta.get("i"), int):
            raise PrunescopeError(f"{where}: tensor {name!r} has no position 'i' in its metadata")
        metas[name] = meta
    return dict(sorted(metas.items(), key=lambda item: item[1]["i"]))


def _shape_of(meta: Mapping[str, Any], where: str) -> tuple[int, ...]:
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PrunescopeError(f"{where}: invalid shape {shape!r} in the metadata")
    return tuple(shape)


def _get(handle: Any, key: str, where: str) -> torch.Tensor:
    if key not in handle.keys():
        raise PrunescopeError(f"{where}: entry {key!r} is missing from the file")
    return handle.get_tensor(key)


def _decode_bitmask(handle: Any, name: str, meta: Mapping[str, Any], where: str) -> torch.Tensor:
    """Rebuild one bitmask tensor, checking every size against the metadata."""
    shape, dtype = _shape_of(meta, where), _dtype_from_name(meta.get("dtype"), where)
    numel = math.prod(shape)
    packed = _get(handle, name + BITMASK_SUFFIX, where)  # [ceil(numel/8)] uint8
    values = _get(handle, name + VALUES_SUFFIX, where)  # [nnz]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != ((numel + 7) // 8,):
        raise PrunescopeError(
            f"{where}: bitmask has shape {tuple(packed.shape)} and dtype {_dtype_name(packed.dtype)}; "
            f"shape {list(shape)} needs uint8 of shape ({(numel + 7) // 8},)"
        )
    bits = unpack_bits(packed, packed.numel() * 8)  # [8 * nbytes]
    mask = bits[:numel]
    if bits[numel:].any():
        raise PrunescopeError(f"{where}: bitmask has nonzero padding bits (corrupt file)")
    nnz = int(torch.count_nonzero(mask))
    if values.dtype != dtype or values.dim() != 1 or values.numel() != nnz:
        raise PrunescopeError(
            f"{where}: values have shape {tuple(values.shape)} and dtype {_dtype_name(values.dtype)}; "
            f"the bitmask keeps {nnz} entries of dtype {_dtype_name(dtype)}"
        )
    out = torch.zeros(numel, dtype=dtype)  # [numel], all +0.0
    if meta.get("signs"):
        out.masked_fill_(_negative_zero_mask(handle, name, mask, where), -0.0)
    out.masked_scatter_(mask, values)
    return out.view(shape)


def _negative_zero_mask(handle: Any, name: str, mask: torch.Tensor, where: str) -> torch.Tensor:
    """[numel] bool: where the dropped entries were -0.0, from the sign bits of the dropped ones."""
    dropped = mask.numel() - int(torch.count_nonzero(mask))
    packed = _get(handle, name + SIGNS_SUFFIX, where)  # [ceil(dropped / 8)] uint8
    if packed.dtype != torch.uint8 or tuple(packed.shape) != ((dropped + 7) // 8,):
        raise PrunescopeError(
            f"{where}: sign bits have shape {tuple(packed.shape)} and dtype "
            f"{_dtype_name(packed.dtype)}; {dropped} dropped entries need uint8 of shape "
            f"({(dropped + 7) // 8},)"
        )
    neg = torch.zeros_like(mask)  # [numel]
    neg.masked_scatter_(~mask, unpack_bits(packed, dropped))
    return neg


def _decode_dense(handle: Any, name: str, meta: Mapping[str, Any], where: str) -> torch.Tensor:
    shape, dtype = _shape_of(meta, where), _dtype_from_name(meta.get("dtype"), where)
    t = _get(handle, name, where)
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise PrunescopeError(
            f"{where}: stored tensor has shape {tuple(t.shape)} and dtype {_dtype_name(t.dtype)}; "
            f"the metadata says {list(shape)} {_dtype_name(dtype)}"
        )
    return t


def _resolve_alias(
    out: Mapping[str, torch.Tensor], name: str, meta: Mapping[str, Any], where: str
) -> torch.Tensor:
    """The already decoded tensor an alias points to, checked against the alias's shape/dtype."""
    target = meta.get("alias_of")
    if target not in out:
        raise PrunescopeError(f"{where}: alias of {target!r}, which is not stored before it")
    t = out[target]
    if tuple(t.shape) != _shape_of(meta, where) or _dtype_name(t.dtype) != meta.get("dtype"):
        raise PrunescopeError(f"{where}: alias shape/dtype {meta.get('shape')} {meta.get('dtype')} "
                              f"differ from {target!r} {list(t.shape)} {_dtype_name(t.dtype)}")
    return t


def _expected_keys(metas: Mapping[str, Mapping[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for name, meta in metas.items():
        if meta.get("layout") == "bitmask":
            keys |= {name + VALUES_SUFFIX, name + BITMASK_SUFFIX}
            if meta.get("signs"):
                keys.add(name + SIGNS_SUFFIX)
        elif meta.get("layout") == "dense":
            keys.add(name)
    return keys


def _decode_all(handle: Any, path: Path, metas: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    extra = set(handle.keys()) - _expected_keys(metas)
    if extra:
        raise PrunescopeError(f"{path}: entries without metadata {sorted(extra)[:5]} (corrupt file)")
    out: dict[str, torch.Tensor] = {}
    decoders = {"bitmask": _decode_bitmask, "dense": _decode_dense}
    for name, meta in tqdm(metas.items(), desc="load sparse", unit="tensor", leave=False, disable=None):
        where = f"{path}, tensor {name!r}"
        layout = meta.get("layout")
        if layout == "alias":
            out[name] = _resolve_alias(out, name, meta, where)
        elif layout in decoders:
            out[name] = decoders[layout](handle, name, meta, where)
        else:
            raise PrunescopeError(f"{where}: unknown layout {layout!r}; expected bitmask, dense or alias")
    return out


def load_sparse(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`save_sparse` back into a state dict (CPU tensors).

    Every tensor is bit-identical to what was saved; tied names share one tensor object.

    Raises:
        PrunescopeError: a missing folder, a folder without the index (interrupted save), an
            unknown format version, a truncated/corrupt file, or a tensor whose stored parts do not
            match its recorded shape/dtype; the message names the file and the tensor.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    path = _weights_path(folder, _read_index(folder))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metas = _tensor_meta(path, handle.metadata() or {})
            return _decode_all(handle, path, metas)
    except SafetensorError as exc:
        raise PrunescopeError(f"{path} is not a readable safetensors file: {exc}") from exc


def read_info(folder: str | os.PathLike[str]) -> SparseCheckpointInfo:
    """The :class:`SparseCheckpointInfo` recorded in a checkpoint's index (no tensors are read)."""
    folder = Path(folder)
    info = dict(_read_index(folder)["info"])
    info["path"] = folder
    info["tensors"] = tuple(
        TensorStats(**{**t, "shape": tuple(t["shape"])}) for t in info["tensors"]
    )
    return SparseCheckpointInfo(**info)


def _skip_weight_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' ``no_init_weights`` where it exists (v5), else a no-op (random init runs)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def load_sparse_model(
    folder: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase | None"]:
    """Rebuild the Hugging Face model (and tokenizer, if saved) from a sparse checkpoint.

    The model is built from ``config.json`` (``AutoModelForCausalLM.from_config``) in the saved
    tensors' dtype, gets the state dict strictly, and is put in eval mode.

    Raises:
        PrunescopeError: as :func:`load_sparse`, or the checkpoint has no ``config.json`` (it was
            saved from a plain state dict), or the tensors do not fit the model the config builds.
    """
    from transformers import AutoModelForCausalLM

    from prunescope import integrity, models

    folder = Path(folder)
    state = load_sparse(folder)
    if not (folder / "config.json").is_file():
        raise PrunescopeError(
            f"{folder} has no config.json (saved from a plain state dict); use load_sparse for "
            "the tensors, or save the model itself with save_sparse(model, ...)"
        )
    config = integrity.read_config(folder)
    stored = {name: (str(folder / WEIGHTS_FILE), tuple(t.shape)) for name, t in state.items()}
    integrity.check_fit(integrity.expected_shapes(config), stored, config, folder / "config.json", exact_names=True)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with _skip_weight_init():  # every parameter is overwritten below; random init only costs time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PrunescopeError(
            f"{folder}: the tensors do not fit {type(model).__name__}: {joined_lines(exc)[:400]}"
        ) from exc
    model.tie_weights()
    model.to(device).eval()
    has_tokenizer = any((folder / f).is_file() for f in models.TOKENIZER_FILES)
    tokenizer = models.load_tokenizer(folder) if has_tokenizer else None
    return model, tokenizer


def info_markdown(info: SparseCheckpointInfo) -> str:
    """A short Markdown summary of a checkpoint: file size against the dense file, per layout."""
    from prunescope.report.io import markdown_table

    rows = []
    for layout in ("bitmask", "dense", "alias"):
        group = [t for t in info.tensors if t.layout == layout]
        if group:
            stored, dense = sum(t.stored_bytes for t in group), sum(t.dense_bytes for t in group)
            rows.append((layout, len(group), f"{dense:,}", f"{stored:,}",
                         f"{stored / dense:.3f}" if dense else "n/a"))
    table = markdown_table(["layout", "tensors", "dense bytes", "stored bytes", "ratio"], rows)
    return (
        f"Sparse checkpoint `{info.path}`: {info.file_bytes:,} bytes, {info.size_ratio:.3f}x the "
        f"dense safetensors file ({info.dense_file_bytes:,} bytes, computed).\n\n{table}\n"
    )
