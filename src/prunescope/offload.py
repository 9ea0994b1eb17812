"""Models larger than memory: one decoder layer on the compute device at a time.

With offload the model is built with empty weights (accelerate's ``init_empty_weights``: every
parameter on the ``meta`` device, buffers real). Weights are read from the checkpoint's own
safetensors shards (memory-mapped, one file open at a time) only while they are used and put
back on the ``meta`` device after: a decoder layer while it is calibrated, pruned and run
(:meth:`OffloadedModel.layer`), the embeddings while the first layer's inputs are computed, the
final norm and the output head while logits are. A changed layer, and every other tensor once
:meth:`OffloadedModel.finish` runs, is written to a *sink* folder as a shard of an ordinary
Hugging Face sharded checkpoint (``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``, as ``save_pretrained`` writes it, loadable by plain
transformers), streamed tensor by tensor; later passes (perplexity after pruning) read it there.

Memory held at any time: one decoder layer (and a method's statistics for it) or the embeddings,
and the activations of the calibration or evaluation windows at one depth; never the model.

Supported: checkpoints in safetensors whose tensor names are the model's own (what
``save_pretrained`` writes; a missing ``model.`` prefix is accepted). A ``.bin`` checkpoint, or
one whose names transformers converts on load, is refused with a line that says so.

Inference-only commands (activations, probe) offload with accelerate's own disk dispatch instead
(:func:`prunescope.models.load` with ``offload=True``): there nothing is written back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import atomic, devices, distributed, integrity, models
from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

T = TypeVar("T")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class CheckpointFiles:
    """Where each tensor of a safetensors checkpoint lives: name -> file inside ``folder``."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def scan(cls, folder: Path) -> "CheckpointFiles":
        """Read the shard index, or the single file's header; nothing else is read."""
        from safetensors import safe_open

        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise PrunescopeError(f"{index} is not a valid safetensors index (no weight_map): {exc}") from exc
            return cls(folder, dict(weight_map))
        single = folder / SINGLE_FILE
        if single.is_file():
            try:
                with safe_open(str(single), framework="pt") as fh:
                    return cls(folder, {key: SINGLE_FILE for key in fh.keys()})
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise PrunescopeError(f"{single} is not a readable safetensors file: {exc}") from exc
        raise PrunescopeError(
            f"--offload reads safetensors checkpoints, and {folder} has neither {SINGLE_FILE} nor "
            f"{INDEX_FILE}; write the model with save_pretrained (safetensors is its default) first"
        )

    def key_for(self, name: str, prefix: str) -> str:
        """The checkpoint key of the model's tensor ``name`` (accepting a missing ``prefix.``)."""
        if name in self.weight_map:
            return name
        short = name.removeprefix(prefix + ".")
        if short in self.weight_map:
            return short
        raise PrunescopeError(
            f"the checkpoint in {self.folder} holds no tensor {name!r}; --offload needs the "
            "tensor names the model itself uses (as save_pretrained writes them)"
        )

    def mapped(self, key: str) -> torch.Tensor:
        """Tensor ``key`` memory-mapped from its file, in its stored dtype, on the CPU: nothing is
        read until used, and only the pages touched (an embedding's looked-up rows) become
        resident. Copy-on-write: writing to it never changes the file."""
        import mmap

        from prunescope.formats import SAFETENSORS_DTYPE_NAMES

        path = self.folder / self.weight_map[key]
        try:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                entry = json.loads(fh.read(header_len))[key]
                buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            dtype = {name: dt for dt, name in SAFETENSORS_DTYPE_NAMES.items()}[entry["dtype"]]
            start, end = entry["data_offsets"]
        except (OSError, ValueError, KeyError) as exc:
            raise PrunescopeError(f"could not map {key} from {path}: {exc}") from exc
        flat = torch.frombuffer(buffer, dtype=dtype, count=(end - start) // dtype.itemsize,
                                offset=8 + header_len + start)
        return flat.reshape(entry["shape"])

    def read(self, names: Mapping[str, str], dtypes: Mapping[str, torch.dtype],
             device: torch.device) -> dict[str, torch.Tensor]:
        """Read model tensors by ``{model name: checkpoint key}`` in ``dtypes[name]`` onto
        ``device``, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, key in names.items():
            by_file.setdefault(self.weight_map[key], []).append((name, key))
        out = {}
        for file, pairs in by_file.items():
            path = self.folder / file
            try:
                with safe_open(str(path), framework="pt", device="cpu") as fh:
                    for name, key in pairs:
                        out[name] = fh.get_tensor(key).to(device=device, dtype=dtypes[name])
            except PrunescopeError:
                raise
            except Exception as exc:
                raise PrunescopeError(f"could not read {', '.join(k for _, k in pairs[:3])} from {path}: {exc}") from exc
        return out


def write_safetensors(path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      tensor_of: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file one tensor at a time; returns the bytes written.

    ``specs`` gives each tensor's shape and dtype (the header comes first); ``tensor_of(name)``
    is called once per tensor, in order, and its bytes go straight to the file (no copy of the
    whole file in memory, unlike ``safetensors.torch.save_file``). The file is flushed to disk.
    """
    from prunescope.formats import SAFETENSORS_DTYPE_NAMES

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for name, (shape, dtype) in specs.items():
            tensor = tensor_of(name).detach().to("cpu").contiguous()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(text) + offset


@dataclass
class ShardWriter:
    """Writes a Hugging Face sharded safetensors checkpoint one shard at a time.

    Shard ``i`` (``0 <= i < layers``) holds decoder layer ``i``; the last shard holds everything
    outside the decoder layers. The index is written by :meth:`finish`, last.
    """

    folder: Path
    layers: int
    weight_map: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)

    def file_name(self, shard: int) -> str:
        """``model-00001-of-00023.safetensors`` style name of shard ``shard`` (0-based)."""
        return f"model-{shard + 1:05d}-of-{self.layers + 1:05d}.safetensors"

    def write(self, shard: int, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
              tensor_of: Callable[[str], torch.Tensor]) -> None:
        """Write (or rewrite) one shard, one tensor at a time (see :func:`write_safetensors`)."""
        name = self.file_name(shard)
        self.file_bytes[name] = write_safetensors(self.folder / name, specs, tensor_of)
        for key, (shape, dtype) in specs.items():
            self.weight_map[key] = name
            self.sizes[key] = math.prod(shape) * dtype.itemsize

    def view(self) -> CheckpointFiles:
        """The tensors written so far, readable like any checkpoint."""
        return CheckpointFiles(self.folder, self.weight_map)

    def finish(self, model: nn.Module, tokenizer: Any) -> None:
        """Write config, generation config, tokenizer and, last, the index."""
        model.config.save_pretrained(self.folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        index = {"metadata": {"total_size": sum(self.sizes.values())},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        path = self.folder / INDEX_FILE
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        atomic.fsync_file(path)

    def nbytes(self) -> int:
        """Bytes of all shard files written."""
        return sum(self.file_bytes.values())


def _set(model: nn.Module, name: str, value: torch.Tensor | None, device: torch.device | str) -> None:
    """Put one parameter on ``device`` (``meta`` frees it), via accelerate."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value, dtype=None if value is None else value.dtype,
                                clear_cache=False)


def release_freed_memory() -> None:
    """Give memory freed by the C allocator back to the system (glibc keeps freed blocks below
    its mmap threshold, up to 32 MB each, so a layer's tensors would stay in the resident set)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl)
            pass


@dataclass(frozen=True)
class Measured(Generic[T]):
    """What :meth:`OffloadedModel.measured` returns: ``work()``'s value, the perplexities before
    and after (None without evaluation) and the seconds of each step."""

    value: T
    dense_ppl: float | None
    changed_ppl: float | None
    work_seconds: float
    eval_seconds: float
    save_seconds: float


class OffloadedModel:
    """A causal LM whose weights live on disk and visit the device only while used.

    Decoder layers visit one at a time (:meth:`layer`); the parts before them (embeddings) only
    while the first layer's inputs are computed, the final norm and output head only while
    logits are. The output is a complete checkpoint in the sink (:meth:`finish`).

    Attributes:
        model: the model; its parameters are on ``meta`` except while in use.
        device / dtype: where and in what layers compute.
        sink: the writer of the (pruned) checkpoint.
    """

    def __init__(self, model: "PreTrainedModel", source: CheckpointFiles, sink: ShardWriter,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.sink = source, sink
        self.device, self.dtype = device, dtype
        self.written: set[int] = set()  # layers whose current weights are in the sink
        self._bind(model, list(range(len(models.adapter_for(model).layers(model)))))

    def _bind(self, model: "PreTrainedModel", source_layers: list[int]) -> None:
        """Take ``model`` (empty weights) as the skeleton; its decoder layer ``i`` is the
        checkpoint's layer ``source_layers[i]``."""
        self.model = model
        self.source_layers = source_layers
        self.adapter = models.adapter_for(model)
        self.decoder = self.adapter.layers(model)
        self._prefix = getattr(model, "base_model_prefix", "model")
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))
        inside = self.adapter.layers_path + "."
        head = self.adapter.head_path + "."
        embed = self.adapter.embed_path + ".weight"
        # parameters outside the decoder layers; a tied head is the embedding, listed once
        self._outer = [n for n, _ in model.named_parameters(remove_duplicate=False)
                       if not n.startswith(inside) and not (self._tied and n.startswith(head))]
        self._front = [n for n in self._outer if not n.startswith(head)]
        tail_prefixes = (head, f"{self.adapter.norm_path}.")
        self._tail = [n for n in self._outer if n.startswith(tail_prefixes)] + ([embed] if self._tied else [])
        self._retie()
        for module in model.modules():  # buffers (rotary frequencies) are real: move them once
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device and buf.device.type != "meta":
                    module._buffers[key] = buf.to(self.device)

    def keep_layers(self, kept: list[int], config: Any) -> None:
        """Drop every decoder layer not in ``kept`` (positions in the current model), before
        anything is written: the skeleton is rebuilt from ``config`` (which must say
        ``len(kept)`` layers) and its layers read from the checkpoint's kept layers."""
        if self.written:
            raise RuntimeError("keep_layers must come before any layer is written")
        self._bind(_empty_from_config(config, self.dtype), [self.source_layers[i] for i in kept])
        self.sink.layers = len(kept)

    def rebuild(self, config: Any) -> None:
        """Rebuild the skeleton from ``config`` (a shrunk model's), the same layers: what
        ``from_pretrained`` builds from the sink, whose config.json becomes ``config``. Every
        layer whose shapes changed must have been written."""
        self._bind(_empty_from_config(config, self.dtype), self.source_layers)

    def _retie(self) -> None:
        if self._tied:
            self.model.get_submodule(self.adapter.head_path).weight = (
                self.model.get_submodule(self.adapter.embed_path).weight)

    def _layer_names(self, index: int) -> list[str]:
        prefix = f"{self.adapter.layers_path}.{index}."
        return [prefix + n for n, _ in self.decoder[index].named_parameters()]

    def _specs(self, names: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each parameter (the model's own: modules kept in float32 stay so)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {n: (tuple(params[n].shape), params[n].dtype) for n in names}

    def _source_name(self, name: str) -> str:
        """The checkpoint's name of the model's tensor ``name`` (decoder layers renumbered
        after :meth:`keep_layers`)."""
        inside = self.adapter.layers_path + "."
        if not name.startswith(inside):
            return name
        index, _, rest = name[len(inside):].partition(".")
        return f"{inside}{self.source_layers[int(index)]}.{rest}"

    def _read(self, names: list[str], files: CheckpointFiles, device: torch.device) -> dict[str, torch.Tensor]:
        stored = {n: self._source_name(n) if files is self.source else n for n in names}
        keys = {n: files.key_for(stored[n], self._prefix) for n in names}
        return files.read(keys, {n: dtype for n, (_, dtype) in self._specs(names).items()}, device)

    @contextlib.contextmanager
    def loaded(self, names: list[str], files: CheckpointFiles | None = None) -> Iterator[None]:
        """The parameters ``names`` on the device (from ``files``, default the checkpoint) for
        the block; back on ``meta`` after, their memory returned."""
        for name, value in self._read(names, files or self.source, self.device).items():
            _set(self.model, name, value, self.device)
        self._retie()
        try:
            yield
        finally:
            for name in names:
                _set(self.model, name, None, "meta")
            self._retie()
            release_freed_memory()

    @contextlib.contextmanager
    def front(self) -> Iterator[None]:
        """The parts before the first decoder layer (embeddings) loaded, for
        :func:`calib.capture_first_layer_inputs`.

        On the CPU the weights of plain ``nn.Embedding`` modules are not read but memory-mapped
        in their stored dtype, their output cast to the compute dtype (a lookup is exact in
        either order): only the rows of the tokens looked up become resident, not the whole
        table (262 MB in float32 for a 32000 x 2048 vocabulary)."""
        mapped = self._mappable_embeddings()
        with self.loaded([n for n in self._front if n not in mapped]), self._mapped(mapped):
            yield

    def _mappable_embeddings(self) -> dict[str, nn.Embedding]:
        """``{weight name: module}`` of the front's plain ``nn.Embedding`` modules (subclasses,
        such as scaled embeddings, compute in the weight's dtype: they are read as usual)."""
        if self.device.type != "cpu":
            return {}
        front = set(self._front)
        return {f"{name}.weight": module for name, module in self.model.named_modules()
                if type(module) is nn.Embedding and f"{name}.weight" in front}

    @contextlib.contextmanager
    def _mapped(self, embeddings: Mapping[str, nn.Embedding]) -> Iterator[None]:
        dtype = self.dtype

        def cast(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            return output.to(dtype)

        handles = []
        try:
            for name, module in embeddings.items():
                _set(self.model, name, self.source.mapped(self.source.key_for(self._source_name(name), self._prefix)),
                     "cpu")
                handles.append(module.register_forward_hook(cast))
            self._retie()
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name in embeddings:
                _set(self.model, name, None, "meta")
            self._retie()

    @contextlib.contextmanager
    def layer(self, index: int, write: bool = False) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights on the device; on exit, written to the sink
        when ``write`` (and the body raised nothing), then freed."""
        names = self._layer_names(index)
        with self.loaded(names, self.sink.view() if index in self.written else self.source):
            try:
                yield self.decoder[index]
                # the body may have replaced the layer (shrink): write and free what is there now
                names_now = self._layer_names(index)
                if write:
                    params = dict(self.model.named_parameters())
                    self.sink.write(index, self._specs(names_now), lambda n: params[n])
                    self.written.add(index)
            finally:
                for name in set(self._layer_names(index)) - set(names):
                    _set(self.model, name, None, "meta")

    def finish(self, tokenizer: Any) -> None:
        """Complete the sink: copy every layer not written yet and the outer parts from the
        checkpoint, one tensor at a time (no compute), then write config, tokenizer and index."""
        cpu = torch.device("cpu")

        def copy(name: str) -> torch.Tensor:
            return self._read([name], self.source, cpu)[name]

        for index in tqdm(range(len(self.decoder)), desc="write layers", unit="layer", leave=False):
            if index not in self.written:
                self.sink.write(index, self._specs(self._layer_names(index)), copy)
                self.written.add(index)
        self.sink.write(len(self.decoder), self._specs(self._outer), copy)
        self.sink.finish(self.model, tokenizer)

    def measured(self, work: Callable[[], T], tokenizer: Any, blocks: torch.Tensor | None, batch_size: int,
                 changed: str) -> "Measured[T]":
        """The offloaded jobs' sequence, each step timed: perplexity of the checkpoint (when
        ``blocks``), ``work()`` (which visits and writes the layers it changes), :meth:`finish`,
        perplexity of what was written (``"{changed} perplexity"`` on its progress bar)."""
        def ppl(desc: str) -> float | None:
            return None if blocks is None else self.perplexity(blocks, batch_size, desc)

        t0 = time.perf_counter()
        before = ppl("dense perplexity")
        t1 = time.perf_counter()
        value = work()
        t2 = time.perf_counter()
        self.finish(tokenizer)
        t3 = time.perf_counter()
        after = ppl(f"{changed} perplexity")
        t4 = time.perf_counter()
        return Measured(value, before, after, work_seconds=t2 - t1, eval_seconds=(t1 - t0) + (t4 - t3),
                        save_seconds=t3 - t2)

    # ------------------------------------------------------------------ evaluation
    def _final_norm(self) -> nn.Module:
        """The norm after the last layer, after checking the family adds nothing before the head."""
        config = self.model.config
        extras = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(config, k, None) is not None]
        decoder_parent = self.model.get_submodule(self.adapter.layers_path.rsplit(".", 1)[0])
        if getattr(decoder_parent, "project_out", None) is not None:
            extras.append("project_out")
        if self.adapter.norm_path is None or extras:
            raise PrunescopeError(
                f"perplexity with --offload is not available for {type(self.model).__name__} "
                f"({', '.join(extras) or 'no known final norm'}); pass --no-eval"
            )
        return self.model.get_submodule(self.adapter.norm_path)

    @torch.no_grad()
    def perplexity(self, blocks: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
        """Perplexity over ``blocks`` (``LongTensor[n, seqlen]``), one layer on the device at a
        time: all windows pass layer 0, then layer 1, ...; then the norm and head, one window's
        logits at a time. Same protocol as :func:`prunescope.evaluate.perplexity`."""
        from prunescope.evaluate import next_token_nll
        from prunescope.pruning import calib

        norm = self._final_norm()
        with self.front():
            inputs = calib.capture_first_layer_inputs(self.model, self.adapter, blocks, batch_size,
                                                      "evaluation windows")
        for index in tqdm(range(len(self.decoder)), desc=desc, unit="layer", leave=False):
            with self.layer(index) as layer:
                inputs = calib.run_layer(layer, inputs)
        total_nll, total_tokens = 0.0, 0
        shard = distributed.shard(blocks, "evaluation windows")
        with self.loaded(self._tail):
            head = self.model.get_submodule(self.adapter.head_path)
            for start, hidden in zip(range(0, shard.shape[0], batch_size), inputs.hidden):
                batch = shard[start : start + batch_size].to(self.device)  # [b, L]
                for row in range(batch.shape[0]):  # one window's logits at a time: [1, L, V]
                    total_nll += next_token_nll(head(norm(hidden[row : row + 1])), batch[row : row + 1])
                total_tokens += batch[:, 1:].numel()
        total_nll, total_tokens = distributed.sum_numbers(total_nll, total_tokens)
        return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------------- building


def checkpoint_folder(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The local folder of ``name_or_path``: the bundled model's cache, a folder, or an HF id
    fetched into the hub cache (safetensors, config and tokenizer files only)."""
    source = models.resolve(name_or_path)
    path = Path(source)
    if path.is_dir():
        from prunescope import formats

        if (path / formats.INDEX_FILE).is_file():
            raise PrunescopeError(
                f"{path} is a prunescope sparse checkpoint; --offload reads Hugging Face safetensors "
                "folders (load it without --offload, or save the model with save_pretrained)"
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise PrunescopeError(f"could not fetch {source!r} for --offload: {exc.__class__.__name__}: {exc}") from exc


def _empty_model(folder: Path, dtype: torch.dtype) -> "PreTrainedModel":
    return _empty_from_config(integrity.read_config(folder), dtype)


def _empty_from_config(config: Any, dtype: torch.dtype) -> "PreTrainedModel":
    """The model ``config`` describes, every parameter on ``meta``, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.dtype = dtype  # what the sink's config.json will say
    return model.eval()


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in their dtype (tied tensors once); works on ``meta``."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse before any work when ``folder``'s disk has less than ``needed`` bytes free."""
    existing = atomic.nearest_existing(folder)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PrunescopeError(
            f"{what} needs {human_bytes(needed)} in {existing}, which has {human_bytes(free)} free; "
            "free some space or choose a folder on another disk"
        )


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000)."""
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def fits_in_memory(folder: Path, dtype: torch.dtype, device: torch.device, margin: float = 0.8) -> bool:
    """Whether the model in ``folder`` in ``dtype`` fits ``margin`` of the device's free memory."""
    import psutil

    needed = dense_bytes(_empty_model(folder, dtype))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    if needed <= margin * free:
        return True
    log.warning("the model needs %.1f GB in %s and %s has %.1f GB free: offloading layer by layer",
                needed / 1e9, str(dtype).removeprefix("torch."), device, free / 1e9)
    return False


def wanted(model: str | None, placement: models.Placement) -> bool:
    """Whether a job on ``model`` offloads: ``placement.offload`` when set; else whether the
    model, a local safetensors folder, fails to fit in the device's free memory (a warning says
    so when it does not; launched in several processes, when it fails to fit in any). Models
    from a hub are not fetched to find out: they load whole."""
    if placement.offload is not None:
        return placement.offload
    folder = Path(models.resolve(model))
    if not folder.is_dir() or not is_safetensors_folder(folder):
        return False
    device = devices.resolve_device(placement.device)
    misfit = not fits_in_memory(folder, dtype_for(folder, placement.dtype, device), device)
    # several processes must take the same path: offload when any of them lacks the memory
    return distributed.sum_numbers(float(misfit))[0] > 0


def is_safetensors_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a safetensors checkpoint :class:`CheckpointFiles` can read."""
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def dtype_for(folder: Path, spec: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``--dtype spec`` given the checkpoint's own (see
    :func:`prunescope.devices.resolve_dtype`)."""
    return devices.resolve_dtype(spec, device, devices.checkpoint_dtype(integrity.read_config(folder)))


@contextlib.contextmanager
def open_model(
    folder: Path,
    dtype: torch.dtype,
    device: torch.device,
    save_dir: Path | None = None,
    scratch: Path | None = None,
) -> Iterator[tuple[OffloadedModel, "PreTrainedTokenizerBase"]]:
    """Open the checkpoint in ``folder`` (see :func:`checkpoint_folder`) offloaded; yield
    ``(offloaded model, tokenizer)``.

    Changed layers go to ``save_dir`` (written atomically: published when the block ends without
    an error) or, without one, to a temporary folder inside ``scratch`` (default: the system's
    temporary folder) removed at the end. The disk is checked for room first.

    Launched in several processes, every process reads the checkpoint and writes the layers it
    computed (the same in every process: the statistics are summed over processes before any
    layer changes): process 0 to ``save_dir``, the others to their own scratch folders, which
    later passes (perplexity after pruning) read.
    """
    integrity.check_model_folder(folder)  # whole files, shapes that fit the config: one clear error
    source = CheckpointFiles.scan(folder)
    model = _empty_model(folder, dtype)
    tokenizer = models.load_tokenizer(folder)
    needed = dense_bytes(model)
    with _sink_folder(save_dir, scratch, needed) as sink_dir:
        sink = ShardWriter(sink_dir, len(models.adapter_for(model).layers(model)))
        log.info("offloading %s: %.2f GB of weights stay on disk; layers visit %s one at a time",
                 folder, needed / 1e9, device)
        yield OffloadedModel(model, source, sink, device, dtype), tokenizer


@contextlib.contextmanager
def _sink_folder(save_dir: Path | None, scratch: Path | None, needed: int) -> Iterator[Path]:
    if save_dir is not None:
        check_disk(save_dir, needed, f"the pruned model ({save_dir})")
        with atomic.new_folder(save_dir) as tmp:
            yield tmp
        return
    import tempfile

    base = scratch if scratch is not None else Path(tempfile.gettempdir())
    check_disk(base, needed, "--offload (the pruned layers wait on disk)")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix="prunescope-offload-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

