"""The prune job: choose layers, score weights, select masks, apply them, measure before/after.

``run_prune(config)`` is what ``prunescope prune`` calls; it returns a frozen
:class:`PruneResult` from which JSON, Markdown and plots are rendered.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import data, evaluate, masks, models
from prunescope.apply import apply_masks
from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

METHODS = ("magnitude",)


@dataclass(frozen=True)
class PruneConfig:
    """Everything the prune job needs; validated once, here, at the edge."""

    model: str = models.DEFAULT_MODEL
    method: str = "magnitude"
    sparsity: float = 0.5
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    eval_text: str = data.DEFAULT_TEXT
    eval_tokens: int | None = 16384
    eval_seqlen: int = 512
    eval_batch_size: int = 4
    evaluate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PrunescopeError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if not 0.0 < self.sparsity < 1.0:
            raise PrunescopeError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.eval_seqlen < 2:
            raise PrunescopeError(f"eval seqlen must be >= 2, got {self.eval_seqlen}")
        if self.eval_tokens is not None and self.eval_tokens < self.eval_seqlen:
            raise PrunescopeError(
                f"eval tokens ({self.eval_tokens}) must be at least eval seqlen ({self.eval_seqlen})"
            )


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned weight: its module name, shape and the fraction of zeros after pruning."""

    name: str
    shape: tuple[int, ...]
    sparsity: float


@dataclass(frozen=True)
class PruneResult:
    """What the prune job measured; the canonical content of ``report.json``."""

    model: str
    method: str
    pattern: str
    scope: str
    sparsity_requested: float
    sparsity_actual: float
    pruned_parameters: int
    total_parameters: int
    dense_ppl: float | None
    pruned_ppl: float | None
    eval_text: str
    eval_tokens: int
    eval_seqlen: int
    prune_seconds: float
    eval_seconds: float
    layers: tuple[LayerSparsity, ...] = field(default_factory=tuple)


def select_linear_layers(
    model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to prune, by name.

    Embeddings and the output head are left dense by default. ``include`` (glob patterns on
    module names) narrows the set; ``exclude`` removes from it.
    """
    adapter = models.adapter_for(model)
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == adapter.head_path:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen[name] = module
    if not chosen:
        raise PrunescopeError(
            "no Linear layer matches the include/exclude patterns "
            f"(include={list(include)}, exclude={list(exclude)})"
        )
    return chosen


def magnitude_global_masks(layers: dict[str, nn.Linear], sparsity: float) -> dict[str, torch.Tensor]:
    """Global L1 magnitude: prune the ``sparsity`` fraction of smallest |w| over all layers."""
    names = list(layers)
    scores = [layers[n].weight.detach().abs() for n in names]  # each [out, in]
    total = sum(s.numel() for s in scores)
    keep = masks.global_keep_masks(scores, round(sparsity * total))
    return dict(zip(names, keep))


def layer_sparsities(layers: dict[str, nn.Linear]) -> tuple[LayerSparsity, ...]:
    """Fraction of exact zeros in each layer's weight."""
    return tuple(
        LayerSparsity(name, tuple(m.weight.shape), (m.weight == 0).float().mean().item())
        for name, m in layers.items()
    )


def _eval(
    model: nn.Module, blocks: torch.Tensor | None, config: PruneConfig, desc: str
) -> float | None:
    if blocks is None:
        return None
    return evaluate.perplexity(model, blocks, batch_size=config.eval_batch_size, desc=desc)


def _eval_blocks(tokenizer: "PreTrainedTokenizerBase", config: PruneConfig) -> torch.Tensor | None:
    if not config.evaluate:
        return None
    tokens = data.tokenize(tokenizer, data.load_text(config.eval_text))
    return data.eval_blocks(tokens, config.eval_seqlen, config.eval_tokens)


def run_prune(
    config: PruneConfig, model: nn.Module | None = None, tokenizer: "PreTrainedTokenizerBase | None" = None
) -> tuple[PruneResult, nn.Module]:
    """Prune ``config.model`` (or the given model) and measure perplexity before and after.

    Returns the result and the pruned model (so callers can save it).
    """
    if model is None or tokenizer is None:
        log.info("loading model %s", config.model)
        model, tokenizer = models.load(config.model)
    blocks = _eval_blocks(tokenizer, config)
    t0 = time.perf_counter()
    dense_ppl = _eval(model, blocks, config, "dense perplexity")
    eval_seconds = time.perf_counter() - t0

    layers = select_linear_layers(model, config.include, config.exclude)
    log.info("pruning %d Linear layers by %s to %.0f%%", len(layers), config.method, 100 * config.sparsity)
    t0 = time.perf_counter()
    keep = magnitude_global_masks(layers, config.sparsity)
    apply_masks(model, keep)
    prune_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    pruned_ppl = _eval(model, blocks, config, "pruned perplexity")
    eval_seconds += time.perf_counter() - t0
    per_layer = layer_sparsities(layers)
    n_total = sum(m.weight.numel() for m in layers.values())
    n_zero = sum(round(ls.sparsity * m.weight.numel()) for ls, m in zip(per_layer, layers.values()))
    result = PruneResult(
        model=config.model,
        method=config.method,
        pattern="unstructured",
        scope="global",
        sparsity_requested=config.sparsity,
        sparsity_actual=n_zero / n_total,
        pruned_parameters=n_zero,
        total_parameters=sum(p.numel() for p in model.parameters()),
        dense_ppl=dense_ppl,
        pruned_ppl=pruned_ppl,
        eval_text=config.eval_text,
        eval_tokens=0 if blocks is None else blocks.numel(),
        eval_seqlen=config.eval_seqlen,
        prune_seconds=prune_seconds,
        eval_seconds=eval_seconds,
        layers=per_layer,
    )
    return result, model
