"""The prune job: choose layers, score weights, select masks, apply them, measure before/after.

``run_prune(config)`` is what ``prunescope prune`` calls; it returns a frozen
:class:`PruneResult` from which JSON, Markdown and plots are rendered. ``prune_model`` is the
pruning step alone (used by the job, the sweep and the benchmarks).

Methods:

- ``magnitude``: ``|w|``, compared over all pruned layers (``global``, the default), within each
  layer (``layer``) or within each output row (``row``);
- ``wanda`` (Sun et al. 2023): ``|w| * ||x_j||``, compared within each output row;
- ``ria`` (Zhang et al. 2024): relative importance times ``||x_j||^0.5``, compared over the layer
  (the authors' default) or within rows (:mod:`prunescope.pruning.ria`);
- ``sparsegpt`` (Frantar & Alistarh 2023): OBS saliency compared within blocks of 128 columns,
  kept weights updated to compensate (see :mod:`prunescope.pruning.sparsegpt`).

N:M patterns compare within each group of M inputs for every method. ``refine="dsnot"`` refines
any method's masks without training (DSnoT, Zhang et al. 2024, :mod:`prunescope.pruning.dsnot`;
for SparseGPT the refined mask is solved again). ``allocation="owl"`` gives each decoder layer
its own sparsity from its outlier ratio on the dense model (OWL, Yin et al. 2024,
:mod:`prunescope.pruning.owl`), the mean over layers the requested one. The calibrated methods run
sequentially, layer by layer (:mod:`prunescope.pruning.calib`): statistics of a layer are collected in one
pass over the dense layer, the layer is pruned, and a second pass gives the next layer's inputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import data, devices, distributed, evaluate, families, models, offload
from prunescope.errors import PrunescopeError
from prunescope.pruning import apply, calib, dsnot, masks, owl, ria, scoring, sparsegpt
from prunescope.pruning.apply import apply_masks, apply_weights
from prunescope.pruning.patterns import SparsityPattern, parse_pattern

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
CALIBRATED = ("wanda", "ria", "sparsegpt")
# Comparison groups each method accepts for unstructured sparsity; the first is the default.
SCOPES: dict[str, tuple[str, ...]] = {
    "magnitude": ("global", "layer", "row"),
    "wanda": ("row", "layer"),
    "ria": ("layer", "row"),
    "sparsegpt": ("block",),
}
ALLOCATIONS = ("uniform", "owl")
REFINES = ("none", "dsnot")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise PrunescopeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class PruneConfig(data.TextOptions, models.Placement):
    """Everything the prune job needs; validated once, here, at the edge.

    The calibration and evaluation options are those of :class:`~prunescope.data.TextOptions`.

    ``sparsity`` is the unstructured fraction (default 0.5); with an N:M ``pattern`` it may be
    left out (it is N/M) or must agree. ``sweep`` lists extra sparsities at which each of
    ``sweep_methods`` (default: ``method``) is pruned from the dense model and evaluated.
    """

    model: str = models.DEFAULT_MODEL
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_incompatible: bool = False
    sweep: tuple[float, ...] = ()
    sweep_methods: tuple[str, ...] = ()
    save_dir: Path | None = None
    allocation: str = "uniform"
    refine: str = "none"
    permute: bool = False
    owl_m: float = owl.DEFAULT_M
    owl_lambda: float = owl.DEFAULT_LAMBDA
    tasks: tuple[str, ...] = ()
    tasks_include_path: Path | None = None
    tasks_limit: int | None = None

    def __post_init__(self) -> None:
        _check_method(self.method)
        for method in self.sweep_methods:
            _check_method(method)
        pattern = self.sparsity_pattern  # validates sparsity and pattern
        if self.scope is not None and self.scope not in SCOPES[self.method]:
            raise PrunescopeError(
                f"scope {self.scope!r} is not available for {self.method}; choose one of "
                f"{', '.join(SCOPES[self.method])}"
            )
        self.check_text_options()
        self.check_placement()
        if self.sweep and pattern.is_nm:
            raise PrunescopeError("--sweep varies unstructured sparsity; it cannot be combined with an N:M pattern")
        for s in self.sweep:
            if not 0.0 < s < 1.0:
                raise PrunescopeError(f"sweep sparsity must be in (0, 1), got {s}")
        if self.sweep and not self.evaluate:
            raise PrunescopeError("--sweep measures perplexity; it cannot be combined with --no-eval")
        if len(self.sweep_methods) > 1 and not self.sweep:
            raise PrunescopeError("several methods need --sweep (one method per plain prune run)")
        self._check_allocation()
        self._check_refine()
        self._check_permute()
        self._check_offload()
        self._check_tasks()

    def _check_tasks(self) -> None:
        """Zero-shot tasks (lm-eval) measured before and after pruning: known names, a model in
        memory in one process."""
        if not self.tasks:
            return
        from prunescope import zeroshot

        zeroshot.check_counts(self.tasks_limit, flag="--tasks-")
        if self.offload:
            raise PrunescopeError("--tasks scores the whole model in memory; it cannot be combined with --offload")
        if distributed.launched():
            raise PrunescopeError("--tasks runs in one process; drop it under torchrun or run `prunescope eval` after --save")
        # unknown names and data that cannot be reached fail here, before the model is loaded
        zeroshot.checked_tasks(self.tasks, self.tasks_include_path)

    def _check_refine(self) -> None:
        """An unknown refinement, or DSnoT after global magnitude, refused before any work."""
        if self.refine not in REFINES:
            raise PrunescopeError(f"unknown refine {self.refine!r}; choose one of {', '.join(REFINES)}")
        methods = self.sweep_methods or (self.method,)
        if self.refine != "none" and "magnitude" in methods and (self.scope or "global") == "global":
            raise PrunescopeError(
                "--refine dsnot refines each layer's masks on its calibration inputs, but global magnitude "
                "chooses all masks at once; pass --scope layer or row, or another --method"
            )

    def _check_permute(self) -> None:
        """Channel permutation serves an N:M pattern chosen on calibration inputs, mask by mask."""
        if not self.permute:
            return
        if not self.sparsity_pattern.is_nm:
            raise PrunescopeError(
                "--permute reorders the MLP's units so that an N:M pattern keeps more; with an unstructured "
                "sparsity every order keeps the same weights: add --pattern 2:4 (or another N:M) or drop --permute"
            )
        methods = self.sweep_methods or (self.method,)
        if len(methods) > 1 or methods[0] not in CALIBRATED:
            raise PrunescopeError(f"--permute works with one calibrated method ({', '.join(CALIBRATED)}), "
                                  f"not {', '.join(methods)}")
        if self.refine != "none":
            raise PrunescopeError("--permute cannot be combined with --refine dsnot (DSnoT swaps weights inside "
                                  "the unpermuted groups); use one of them")

    def _check_allocation(self) -> None:
        """OWL's options, and the patterns and scopes it cannot serve, refused before any work."""
        if self.allocation not in ALLOCATIONS:
            raise PrunescopeError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "owl":
            return
        if self.sparsity_pattern.is_nm:
            raise PrunescopeError(
                f"--allocation owl varies the sparsity from layer to layer, but an N:M pattern "
                f"({self.pattern}) fixes it at N/M in every group of every layer; use an unstructured sparsity"
            )
        methods = self.sweep_methods or (self.method,)
        if "magnitude" in methods and (self.scope or "global") == "global":
            raise PrunescopeError(
                "--allocation owl sets each decoder layer's sparsity, but global magnitude chooses its own "
                "allocation over all layers; pass --scope layer or row, or --method wanda / sparsegpt"
            )
        if not self.owl_m > 0:
            raise PrunescopeError(f"--owl-m must be a positive multiple of the mean score, got {self.owl_m}")
        for s in (self.sparsity_pattern.sparsity, *self.sweep):
            if not 0.0 <= self.owl_lambda < min(s, 1.0 - s):
                raise PrunescopeError(
                    f"--owl-lambda {self.owl_lambda:g} is out of range at sparsity {s:g}: every layer gets "
                    f"sparsity +- lambda, so lambda must be in [0, {min(s, 1.0 - s):g})"
                )

    def _check_offload(self) -> None:
        """What layer-by-layer offloading cannot do, refused before any work."""
        if not self.offload:
            return
        if self.sweep:
            raise PrunescopeError("--sweep cannot be combined with --offload (it restores the dense weights in memory)")
        if self.method == "magnitude" and self.effective_scope == "global":
            raise PrunescopeError(
                "global magnitude compares all weights at once, which --offload never holds; "
                "pass --scope layer or row, or --method wanda / sparsegpt"
            )

    @property
    def calibrated(self) -> bool:
        """Whether the run needs calibration windows (a calibrated method, or OWL's ratios)."""
        methods = {self.method, *self.sweep_methods}
        return bool(methods & set(CALIBRATED)) or self.allocation == "owl" or self.refine != "none"

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        """The parsed pattern (fraction or N:M)."""
        return parse_pattern(self.pattern, self.sparsity)

    @property
    def effective_scope(self) -> str:
        """The comparison group actually used: ``group`` for N:M, else the (default) scope."""
        if self.sparsity_pattern.is_nm:
            return "group"
        return self.scope or SCOPES[self.method][0]


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned weight: its module name, shape and the fraction of zeros after pruning."""

    name: str
    shape: tuple[int, ...]
    sparsity: float


@dataclass(frozen=True)
class LayerTarget:
    """OWL's allocation for one decoder layer: its outlier ratio on the dense model and the
    sparsity it was given."""

    index: int
    outlier_ratio: float
    sparsity: float


@dataclass(frozen=True)
class SweepPoint:
    """Perplexity of one method at one sparsity, pruned from the dense model."""

    method: str
    sparsity: float
    sparsity_actual: float
    ppl: float | None
    prune_seconds: float


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
    skipped_layers: tuple[str, ...] = ()
    calib_text: str | None = None
    calib_samples: int = 0
    calib_seqlen: int = 0
    calib_activation_bytes: int = 0
    seed: int = 0
    sweep: tuple[SweepPoint, ...] = ()
    checkpoint: Mapping[str, Any] | None = None
    offloaded: bool = False
    peak_rss_bytes: int | None = None
    allocation: str = "uniform"
    layer_targets: tuple[LayerTarget, ...] = ()
    refine: str = "none"
    permute: bool = False
    dense_accuracy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    pruned_accuracy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


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


def split_incompatible(
    layers: dict[str, nn.Linear], pattern: SparsityPattern, skip: bool
) -> tuple[dict[str, nn.Linear], tuple[str, ...]]:
    """Separate layers whose input size is not a multiple of M (N:M); error unless ``skip``."""
    bad = [n for n, m in layers.items() if not pattern.compatible(m.weight.shape[1])]
    if bad and not skip:
        first = layers[bad[0]]
        raise PrunescopeError(
            f"N:M {pattern.label} needs an input size that is a multiple of {pattern.m}, but "
            f"{bad[0]}.weight has shape {tuple(first.weight.shape)}"
            + (f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else "")
            + "; pass --skip-incompatible to leave such layers dense, or --exclude them"
        )
    if len(bad) == len(layers):
        raise PrunescopeError(f"no selected layer has an input size that is a multiple of {pattern.m}")
    for name in bad:
        log.warning("skipping %s: input size %d is not a multiple of %d", name, layers[name].weight.shape[1], pattern.m)
    return {n: m for n, m in layers.items() if n not in bad}, tuple(bad)


def keep_mask(scores: torch.Tensor, pattern: SparsityPattern, scope: str) -> torch.Tensor:
    """Keep-mask of one weight from its scores: N:M groups, or per row / per layer fraction."""
    if pattern.is_nm:
        return masks.nm_keep_mask(scores, pattern.n, pattern.m)
    if scope == "row":
        return masks.row_keep_masks(scores, pattern.sparsity)
    if scope == "layer":
        return masks.layer_keep_mask(scores, pattern.sparsity)
    raise ValueError(f"keep_mask handles scopes row and layer, not {scope!r}")


def magnitude_global_masks(layers: dict[str, nn.Linear], sparsity: float) -> dict[str, torch.Tensor]:
    """Global L1 magnitude: prune the ``sparsity`` fraction of smallest |w| over all layers."""
    names = list(layers)
    scores = [layers[n].weight.detach().abs() for n in names]  # each [out, in]
    total = sum(s.numel() for s in scores)
    keep = masks.global_keep_masks(scores, round(sparsity * total))
    return dict(zip(names, keep))


def magnitude_masks(
    layers: dict[str, nn.Linear], pattern: SparsityPattern, scope: str
) -> dict[str, torch.Tensor]:
    """Magnitude keep-masks for every layer in the given scope (pure: reads weights only)."""
    if scope == "global" and not pattern.is_nm:
        return magnitude_global_masks(layers, pattern.sparsity)
    return {n: keep_mask(scoring.magnitude(m.weight), pattern, scope) for n, m in layers.items()}


def _group_by_decoder_layer(
    model: nn.Module, layers: dict[str, nn.Linear]
) -> dict[int, dict[str, nn.Linear]]:
    """Map decoder-layer index -> the selected Linear modules inside it."""
    prefix = models.adapter_for(model).layers_path + "."
    grouped: dict[int, dict[str, nn.Linear]] = {}
    for name, module in layers.items():
        index, _, rest = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit() or not rest:
            raise PrunescopeError(
                f"calibrated methods prune Linear layers inside the decoder layers ({prefix}N.*); "
                f"{name} is outside them: --exclude it or use --method magnitude"
            )
        grouped.setdefault(int(index), {})[name] = module
    return grouped


def _prune_decoder_layer(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    stats: Mapping[str, calib.InputStats],
    method: str,
    pattern: SparsityPattern,
    scope: str,
    refine: str = "none",
) -> None:
    """Prune one decoder layer's Linears from their statistics: masks from scores (magnitude,
    Wanda, RIA), or SparseGPT's updated weights (each computed purely, then applied); with
    ``refine="dsnot"`` each mask is refined first (SparseGPT's refined mask is solved again)."""
    if method != "sparsegpt":
        keep = {
            n: _refined(m.weight, keep_mask(_scores(method, m.weight, stats[n]), pattern, scope), stats[n],
                        pattern, refine)
            for n, m in targets.items()
        }
        apply_masks(model, keep)
        return
    # Memory: the Linears reading the same input (q/k/v) share one Hessian ([in, in], 127 MB for
    # a 5632-wide input), factored once in its own buffer and freed once they are done; each
    # updated weight goes into its module at once, so the layer's old and new weights are never
    # held together.
    by_input: dict[int, list[str]] = {}
    for name in targets:
        by_input.setdefault(id(stats[name]), []).append(name)
    for names in by_input.values():
        factor = sparsegpt.factor(stats[names[0]].hessian(), overwrite=True)
        for name in names:
            _sparsegpt_one(model, name, targets[name].weight, factor, stats[name], pattern, refine)
        del factor


def _sparsegpt_one(
    model: nn.Module, name: str, weight: torch.Tensor, factor: sparsegpt.HessianFactor,
    stats: calib.InputStats, pattern: SparsityPattern, refine: str,
) -> None:
    """SparseGPT on one Linear, its updated weight copied into the module. A function of its own
    so the updated weight and mask (46 + 12 MB for a 2048 x 5632 Linear) are freed before the
    next Linear is solved, not held across the loop."""
    new_weight, keep = sparsegpt.prune(weight, factor, pattern)
    if refine != "none":
        keep = _refined(weight, keep, stats, pattern, refine)
        new_weight, _ = sparsegpt.prune(weight, factor, keep=keep)
    apply_weights(model, {name: new_weight})


def _scores(method: str, weight: torch.Tensor, stats: calib.InputStats) -> torch.Tensor:
    """``[out, in]`` importance of one weight by a mask method (higher = keep)."""
    if method == "magnitude":
        return scoring.magnitude(weight)
    if method == "wanda":
        return scoring.wanda(weight, stats.sq_sum)
    if method == "ria":
        return ria.score(weight, stats.sq_sum)
    raise ValueError(f"{method} does not choose its masks from scores")


def _refined(
    weight: torch.Tensor, keep: torch.Tensor, stats: calib.InputStats, pattern: SparsityPattern, refine: str
) -> torch.Tensor:
    """``keep`` refined by DSnoT on the input means and mean squares (or as it is)."""
    if refine == "none":
        return keep
    tokens = max(stats.tokens, 1)
    assert stats.lin_sum is not None  # collected with means=True when refining
    mean = (stats.lin_sum / tokens).float()  # [in]
    sq_mean = (stats.sq_sum / tokens).float()  # [in]
    n_m = (pattern.n, pattern.m) if pattern.is_nm else None
    return dsnot.refine(weight, keep, mean, sq_mean, n_m=n_m)


def prune_sequential(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    method: str,
    pattern: SparsityPattern,
    scope: str,
    calib_blocks: torch.Tensor,
    batch_size: int = 8,
    sparsities: Mapping[int, float] | None = None,
    refine: str = "none",
    permute: bool = False,
) -> int:
    """A method on calibration inputs, layer by layer; returns activation bytes held."""
    grouped = _group_by_decoder_layer(model, layers)

    def step(index: int, layer: nn.Module, inputs: calib.LayerInputs) -> None:
        targets = grouped.get(index)
        if targets:
            _prune_step(model, layer, targets, inputs, method, layer_pattern(pattern, sparsities, index), scope,
                        refine, permute)

    return calib.sequential(model, calib_blocks, step, max(grouped), batch_size, f"{method} {pattern.label}")


def _prune_step(
    model: nn.Module,
    layer: nn.Module,
    targets: dict[str, nn.Linear],
    inputs: calib.LayerInputs | None,
    method: str,
    pattern: SparsityPattern,
    scope: str,
    refine: str = "none",
    permute: bool = False,
) -> None:
    """Prune the ``targets`` inside one decoder layer (calibrated methods read ``inputs``);
    with ``permute`` (N:M) the MLP's units are reordered first (:func:`permute_mlp_units`)."""
    if method == "magnitude" and refine == "none":
        apply_masks(model, magnitude_masks(targets, pattern, scope))
        return
    if inputs is None:
        raise ValueError(f"{method} needs the layer's calibration inputs")
    if permute and pattern.is_nm:
        permute_mlp_units(model, layer, targets, inputs, method, pattern)
    if method != "sparsegpt":
        stats = calib.collect_stats(layer, targets, inputs, hessian=False, means=refine != "none")
        _prune_decoder_layer(model, targets, stats, method, pattern, scope, refine)
        return
    # SparseGPT's Hessians: the MLP writer's (127 MB for a 5632-wide input) is collected, used and
    # freed first, then the others (48 MB) in a pass that stops after the last of them. The
    # result is the one-pass result bit for bit: the writer is the layer's last Linear, so
    # pruning it changes no other Linear's input in the layer.
    for group, stop_early in _writer_first(model, targets):
        stats = calib.collect_stats(layer, group, inputs, hessian=True, means=refine != "none",
                                    stop_early=stop_early)
        _prune_decoder_layer(model, group, stats, method, pattern, scope, refine)
        del stats


def permute_mlp_units(
    model: nn.Module, layer: nn.Module, targets: dict[str, nn.Linear], inputs: calib.LayerInputs, method: str,
    pattern: SparsityPattern,
) -> float | None:
    """Reorder the MLP's units in ``layer`` (gate/up rows, the writer's columns) by RIA's channel
    permutation of the writer's scores, before anything in the layer is pruned: the layer computes
    exactly what it did, and the writer's N:M groups, now contiguous in storage, keep more of its
    score. Only the MLP writer can be permuted this way in plain ``transformers``: the other
    Linears read the residual stream or attention heads, whose order other layers share.

    The scores are the method's (SparseGPT's, which change as it solves, by Wanda's). Returns
    the kept score's relative gain, or None where the layer has no MLP writer among ``targets``.
    """
    layout = families.family_for(model).layouts(model.config)[families.MLP]
    assert layout.writer is not None
    writer = next((n for n in targets if n.endswith("." + layout.writer)), None)
    if writer is None:
        return None
    stats = calib.collect_stats(layer, {writer: targets[writer]}, inputs, hessian=False)[writer]
    scores = _scores("wanda" if method == "sparsegpt" else method, targets[writer].weight, stats)  # [out, units]
    perm = ria.permute_for_nm(scores, pattern.n, pattern.m)
    identity = torch.arange(perm.numel(), device=perm.device)
    before = ria.kept_nm_score(scores, identity, pattern.n, pattern.m)
    after = ria.kept_nm_score(scores, perm, pattern.n, pattern.m)
    apply.permute_units(layer, layout, perm)
    gain = after / before - 1.0 if before > 0 else 0.0
    log.debug("%s: N:M kept score %+.2f%% after permuting the MLP units", writer, 100 * gain)
    return gain


def _writer_first(model: nn.Module, targets: dict[str, nn.Linear]) -> list[tuple[dict[str, nn.Linear], bool]]:
    """``targets`` as (group, stop early) passes: the MLP writer alone, then the rest (where
    the family is known and both groups are non-empty), else one pass over all."""
    try:
        writer = "." + families.family_for(model).layouts(model.config)[families.MLP].writer
    except (PrunescopeError, KeyError):
        return [(targets, False)]
    last = {n: m for n, m in targets.items() if n.endswith(writer)}
    rest = {n: m for n, m in targets.items() if n not in last}
    return [(last, False), (rest, True)] if last and rest else [(targets, False)]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    method: str,
    pattern: SparsityPattern,
    scope: str,
    calib_blocks: torch.Tensor | None = None,
    batch_size: int = 8,
    sparsities: Mapping[int, float] | None = None,
    refine: str = "none",
    permute: bool = False,
) -> int:
    """Prune ``layers`` of ``model`` in place; returns the calibration activation bytes held.

    ``sparsities`` (decoder-layer index -> unstructured sparsity, e.g. from OWL) replaces the
    pattern's sparsity layer by layer; ``refine="dsnot"`` refines every mask (calibrated);
    ``permute`` (N:M, calibrated methods) reorders each layer's MLP units first."""
    if permute and (method not in CALIBRATED or not pattern.is_nm):
        raise ValueError(f"permute serves an N:M pattern with a calibrated method, not {method} {pattern.label}")
    if permute:
        families.family_for(model, "--permute")  # the MLP layout is known, or one clear line before any work
    if method == "magnitude" and sparsities is None and refine == "none":
        apply_masks(model, magnitude_masks(layers, pattern, scope))
        return 0
    if method == "magnitude" and refine == "none":
        for index, targets in _group_by_decoder_layer(model, layers).items():
            apply_masks(model, magnitude_masks(targets, layer_pattern(pattern, sparsities, index), scope))
        return 0
    if calib_blocks is None:
        raise ValueError(f"{method} needs calibration blocks")
    return prune_sequential(model, layers, method, pattern, scope, calib_blocks, batch_size, sparsities, refine,
                            permute)


def layer_pattern(pattern: SparsityPattern, sparsities: Mapping[int, float] | None, index: int) -> SparsityPattern:
    """The pattern decoder layer ``index`` is pruned to: its own sparsity when one is allocated."""
    return pattern if sparsities is None else SparsityPattern(sparsities[index])


@torch.no_grad()
def owl_ratios(
    model: nn.Module,
    grouped: Mapping[int, Mapping[str, nn.Linear]],
    calib_blocks: torch.Tensor,
    m: float,
    batch_size: int = 8,
    visit: calib.LayerVisit | None = None,
    front: Any = None,
) -> dict[int, float]:
    """OWL's outlier ratio of each decoder layer: one calibration pass over the dense model.

    Each layer's Wanda scores (all its selected Linears pooled) are compared with ``m`` times
    their mean; nothing is pruned. Offloaded, ``visit`` must not write the layers back."""
    ratios: dict[int, float] = {}

    def step(index: int, layer: nn.Module, inputs: calib.LayerInputs) -> None:
        targets = grouped.get(index)
        if targets:
            stats = calib.collect_stats(layer, targets, inputs, hessian=False)

            def scores() -> Iterator[torch.Tensor]:
                return (scoring.wanda(t.weight, stats[n].sq_sum) for n, t in targets.items())

            ratios[index] = owl.outlier_ratio(scores, m)

    calib.sequential(model, calib_blocks, step, max(grouped), batch_size, "OWL outlier ratios", visit=visit, front=front)
    return ratios


def _allocation(
    config: PruneConfig, ratios: Mapping[int, float] | None, sparsity: float
) -> tuple[dict[int, float] | None, tuple[LayerTarget, ...]]:
    """Per-layer sparsities at ``sparsity`` (None when uniform) and the report's rows."""
    if ratios is None:
        return None, ()
    sparsities = owl.allocate_by_index(ratios, sparsity, config.owl_lambda)
    return sparsities, tuple(LayerTarget(i, ratios[i], sparsities[i]) for i in sorted(ratios))


def layer_sparsities(layers: dict[str, nn.Linear]) -> tuple[LayerSparsity, ...]:
    """Fraction of exact zeros in each layer's weight."""
    return tuple(
        LayerSparsity(name, tuple(m.weight.shape), (m.weight == 0).float().mean().item())
        for name, m in layers.items()
    )


def actual_sparsity(layers: dict[str, nn.Linear]) -> tuple[int, int]:
    """(zeros, total) over the weights of ``layers``."""
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros, sum(m.weight.numel() for m in layers.values())


def _owl_ratios_in_memory(
    model: nn.Module, layers: dict[str, nn.Linear], config: PruneConfig, calib_blocks: torch.Tensor | None
) -> dict[int, float] | None:
    """OWL's outlier ratios of the dense in-memory model, or None for a uniform allocation."""
    if config.allocation != "owl":
        return None
    assert calib_blocks is not None  # owl is calibrated
    grouped = _group_by_decoder_layer(model, layers)
    return owl_ratios(model, grouped, calib_blocks, config.owl_m, config.calib_batch_size)


def _run_sweep(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    config: PruneConfig,
    calib_blocks: torch.Tensor | None,
    eval_blocks: torch.Tensor | None,
    ratios: Mapping[int, float] | None = None,
) -> tuple[SweepPoint, ...]:
    """Prune from the dense weights at each sweep sparsity for each method; weights restored after.

    ``ratios``: OWL's outlier ratios of the dense model (allocated anew at each sparsity)."""
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    points = []
    for method in config.sweep_methods or (config.method,):
        scope = config.scope if config.scope in SCOPES[method] else SCOPES[method][0]
        for s in config.sweep:
            log.info("sweep: %s at %.0f%%", method, 100 * s)
            t0 = time.perf_counter()
            sparsities, _ = _allocation(config, ratios, s)
            prune_model(model, layers, method, SparsityPattern(s), scope, calib_blocks, config.calib_batch_size,
                        sparsities, config.refine)
            seconds = time.perf_counter() - t0
            zeros, total = actual_sparsity(layers)
            ppl = evaluate.perplexity_or_none(model, eval_blocks, config.eval_batch_size, f"{method} {s:g} perplexity")
            points.append(SweepPoint(method, s, zeros / total, ppl, seconds))
            apply_weights(model, dense)
    return tuple(points)


_CHECKPOINT_KEYS = (
    "path", "file_bytes", "dense_file_bytes", "size_ratio", "sparse_tensors", "dense_tensors",
    "format_version", "save_seconds",
)


def _save(model: nn.Module, tokenizer: Any, folder: Path) -> Mapping[str, Any]:
    """Write the pruned model (and tokenizer) as a compressed sparse checkpoint.

    Returns the writer's summary (file size against the dense safetensors file, tensor counts);
    the per-tensor statistics stay in the checkpoint's own index.
    """
    from prunescope import formats  # imported only when --save is used
    from prunescope.report import to_jsonable

    info = to_jsonable(formats.save_sparse(model, folder, tokenizer=tokenizer))
    if not isinstance(info, dict):
        info = {"info": info}
    saved = {k: info[k] for k in _CHECKPOINT_KEYS if k in info} or dict(info)
    saved.setdefault("path", str(folder))
    return saved


def run_prune(
    config: PruneConfig, model: nn.Module | None = None, tokenizer: "PreTrainedTokenizerBase | None" = None
) -> tuple[PruneResult, nn.Module]:
    """Prune ``config.model`` (or the given model) and measure perplexity before and after.

    With ``config.offload`` (or, when it is None, a model that does not fit the device's free
    memory) the model never sits in memory whole: see :func:`run_prune_offloaded`.

    Returns the result and the pruned model (so callers can save it; offloaded, its decoder
    layers are on the ``meta`` device and the pruned weights are in the saved folder).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both a model and its tokenizer, or neither (config.model is loaded)")
    if model is None and offload.wanted(config.model, config):
        if config.tasks:
            raise PrunescopeError(
                f"{config.model} does not fit the device's free memory and would be offloaded, but --tasks "
                "scores the whole model in memory; drop --tasks and run `prunescope eval` on the --save folder"
            )
        return run_prune_offloaded(dataclasses.replace(config, offload=True))
    if model is None or tokenizer is None:
        log.info("loading model %s", config.model)
        model, tokenizer = config.load_model(config.model)
    pattern, scope = config.sparsity_pattern, config.effective_scope
    layers, skipped = split_incompatible(
        select_linear_layers(model, config.include, config.exclude), pattern, config.skip_incompatible
    )
    calibrated = config.calibrated
    if calibrated:
        _group_by_decoder_layer(model, layers)  # fail early on layers outside the decoder
    calib_blocks = config.calibration_windows(tokenizer) if calibrated else None
    blocks = config.evaluation_windows(tokenizer)
    t0 = time.perf_counter()
    dense_ppl = evaluate.perplexity_or_none(model, blocks, config.eval_batch_size, "dense perplexity")
    dense_accuracy = _zeroshot(model, tokenizer, config, "dense")
    eval_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ratios = _owl_ratios_in_memory(model, layers, config, calib_blocks)  # of the dense model
    owl_seconds = time.perf_counter() - t0
    sweep = _run_sweep(model, layers, config, calib_blocks, blocks, ratios) if config.sweep else ()

    log.info("pruning %d Linear layers: %s %s (%s) to %.0f%%", len(layers), config.method,
             pattern.label, scope, 100 * pattern.sparsity)
    t0 = time.perf_counter()
    sparsities, targets = _allocation(config, ratios, pattern.sparsity)
    held = prune_model(model, layers, config.method, pattern, scope, calib_blocks, config.calib_batch_size,
                       sparsities, config.refine, config.permute)
    prune_seconds = time.perf_counter() - t0 + owl_seconds

    t0 = time.perf_counter()
    pruned_ppl = evaluate.perplexity_or_none(model, blocks, config.eval_batch_size, "pruned perplexity")
    pruned_accuracy = _zeroshot(model, tokenizer, config, "pruned")
    eval_seconds += time.perf_counter() - t0
    checkpoint = _save(model, tokenizer, config.save_dir) if config.save_dir and distributed.is_main() else None
    result = _result(
        config, calibrated, layer_sparsities(layers), actual_sparsity(layers), skipped,
        sum(p.numel() for p in model.parameters()),
        dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, eval_tokens=0 if blocks is None else blocks.numel(),
        prune_seconds=prune_seconds, eval_seconds=eval_seconds, calib_activation_bytes=held, sweep=sweep,
        checkpoint=checkpoint, layer_targets=targets, dense_accuracy=dense_accuracy,
        pruned_accuracy=pruned_accuracy,
    )
    return result, model


def _zeroshot(
    model: nn.Module, tokenizer: "PreTrainedTokenizerBase", config: PruneConfig, label: str
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy on ``config.tasks`` (empty without tasks); ``label`` names the model in the log."""
    if not config.tasks:
        return {}
    from prunescope import zeroshot

    log.info("zero-shot accuracy of the %s model on %s", label, ", ".join(config.tasks))
    return zeroshot.accuracy(model, tokenizer, config.tasks, limit=config.tasks_limit,
                             include_path=config.tasks_include_path)


def _result(
    config: PruneConfig,
    calibrated: bool,
    layers: tuple[LayerSparsity, ...],
    counts: tuple[int, int],
    skipped: tuple[str, ...],
    total_parameters: int,
    **measured: Any,
) -> PruneResult:
    """The :class:`PruneResult` of a run from its config, the pruned layers, their
    ``(zeros, total)`` weights and ``measured`` (perplexities, times, checkpoint, ...)."""
    pattern = config.sparsity_pattern
    zeros, total = counts
    return PruneResult(
        model=config.model,
        method=config.method,
        pattern=pattern.label,
        scope=config.effective_scope,
        sparsity_requested=pattern.sparsity,
        sparsity_actual=zeros / total,
        pruned_parameters=zeros,
        total_parameters=total_parameters,
        eval_text=config.eval_text,
        eval_seqlen=config.eval_seqlen,
        layers=layers,
        skipped_layers=skipped,
        calib_text=config.calib_text if calibrated else None,
        calib_samples=config.calib_samples if calibrated else 0,
        calib_seqlen=config.calib_seqlen if calibrated else 0,
        seed=config.seed,
        peak_rss_bytes=peak_rss_bytes(),
        allocation=config.allocation,
        refine=config.refine,
        permute=config.permute,
        **measured,
    )


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has held so far (Linux/macOS), else None.

    On Linux the figure starts from the resident size of the process this one was forked from
    (the kernel carries it over at exec): start it from a small parent (a shell) to measure it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def run_prune_offloaded(config: PruneConfig) -> tuple[PruneResult, nn.Module]:
    """The prune job with one decoder layer in memory at a time (:mod:`prunescope.offload`).

    Weights are read from the checkpoint's safetensors shards, each pruned layer is written as
    its own shard (to ``config.save_dir``, a Hugging Face sharded folder, or else to a scratch
    folder in ``config.offload_folder``), and perplexity runs through the same per-layer loop.
    """
    device = devices.resolve_device(config.device)
    folder = offload.checkpoint_folder(config.model)
    dtype = offload.dtype_for(folder, config.dtype, device)
    save_dir = config.save_dir if distributed.is_main() else None
    with offload.open_model(folder, dtype, device, save_dir, config.offload_folder) as (off, tokenizer):
        model = off.model
        layers, skipped = split_incompatible(
            select_linear_layers(model, config.include, config.exclude), config.sparsity_pattern,
            config.skip_incompatible,
        )
        grouped = _group_by_decoder_layer(model, layers)
        calibrated = config.calibrated
        calib_blocks = config.calibration_windows(tokenizer) if calibrated else None
        blocks = config.evaluation_windows(tokenizer)
        offload.release_freed_memory()  # what tokenizing the whole text took
        run = off.measured(lambda: _prune_offloaded(off, grouped, config, calib_blocks), tokenizer, blocks,
                           config.eval_batch_size, "pruned")
        pruned, held, targets = run.value
        checkpoint = None if save_dir is None else {
            "path": str(save_dir), "format": "huggingface safetensors shards (dense)",
            "file_bytes": off.sink.nbytes(), "shards": len(set(off.sink.weight_map.values())),
            "save_seconds": run.save_seconds,
        }
    result = _result(
        config, calibrated, *pruned, skipped, sum(p.numel() for p in model.parameters()),
        dense_ppl=run.dense_ppl, pruned_ppl=run.changed_ppl, eval_tokens=0 if blocks is None else blocks.numel(),
        prune_seconds=run.work_seconds, eval_seconds=run.eval_seconds, calib_activation_bytes=held,
        checkpoint=checkpoint, offloaded=True, layer_targets=targets,
    )
    return result, model


def _prune_offloaded(
    off: offload.OffloadedModel, grouped: dict[int, dict[str, nn.Linear]], config: PruneConfig,
    calib_blocks: torch.Tensor | None,
) -> tuple[tuple[tuple[LayerSparsity, ...], tuple[int, int]], int, tuple[LayerTarget, ...]]:
    """Prune each decoder layer while it is on the device; returns ((its sparsities,
    (zeros, total)), the calibration activation bytes held, OWL's allocation)."""
    pattern, scope, method = config.sparsity_pattern, config.effective_scope, config.method
    if config.permute:
        families.family_for(off.model, "--permute")  # the MLP layout is known, or one clear line before any work
    recorded: list[LayerSparsity] = []
    counts = [0, 0]
    ratios = None
    if config.allocation == "owl":  # a first pass over the dense layers, read and never written
        ratios = owl_ratios(off.model, grouped, calib_blocks, config.owl_m, config.calib_batch_size,
                            visit=lambda index: off.layer(index, write=False), front=off.front)
    sparsities, allocated = _allocation(config, ratios, pattern.sparsity)

    def step(index: int, layer: nn.Module, inputs: calib.LayerInputs | None) -> None:
        targets = grouped.get(index)
        if targets:
            _prune_step(off.model, layer, targets, inputs, method, layer_pattern(pattern, sparsities, index), scope,
                        config.refine, config.permute)
            recorded.extend(layer_sparsities(targets))
            for i, n in enumerate(actual_sparsity(targets)):
                counts[i] += n

    def visit(index: int) -> Any:
        return off.layer(index, write=index in grouped)

    log.info("pruning %d Linear layers layer by layer: %s %s (%s) to %.0f%%",
             sum(map(len, grouped.values())), method, pattern.label, scope, 100 * pattern.sparsity)
    if method in CALIBRATED or config.refine != "none":
        held = calib.sequential(off.model, calib_blocks, step, max(grouped), config.calib_batch_size,
                                f"{method} {pattern.label}", visit=visit, front=off.front)
    else:
        held = 0
        for index in tqdm(sorted(grouped), desc=f"{method} {pattern.label}", unit="layer", leave=False):
            with visit(index) as layer:
                step(index, layer, None)
    return (tuple(recorded), (counts[0], counts[1])), held, allocated
