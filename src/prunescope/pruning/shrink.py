"""The shrink job: remove MLP channels, attention heads and whole decoder layers for real.

``run_shrink(config)`` is what ``prunescope shrink`` calls. It returns a frozen
:class:`ShrinkResult` (and the shrunk model), from which report.json, report.md and the plots are
rendered. The shrunk model is an ordinary Hugging Face model with a rewritten config: saved with
``save_pretrained`` it loads in plain ``transformers``, smaller and faster.

Steps:

1. :func:`make_plan` checks every size against the model before any heavy work.
2. Layers (``drop_layers``): ShortGPT's block influence ``1 - cos(input, output)`` of each dense
   layer on the calibration tokens; the least influential layers go, the rest are renumbered.
3. Channels and heads, sequentially (:func:`prunescope.pruning.calib.sequential`): for each layer,
   attention first, then the MLP: collect the writer's input statistics, score the units, keep
   the best, compensate the writer (``bias`` or ``lstsq``), and rebuild the layer smaller. Each
   layer sees the outputs of the already shrunk layers before it; the MLP's statistics are taken
   with the layer's attention already pruned.
4. The model is rebuilt from the shrunk config, measured (perplexity, parameters, latency side
   by side with the dense model), optionally recovered by distillation, and saved.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import data, devices, distributed, evaluate, families, models, offload
from prunescope.errors import PrunescopeError
from prunescope.families import KV, MLP, Q, Family, Shape, UnitLayout
from prunescope.pruning import apply, calib, structured
from prunescope.pruning.structured import COMPENSATIONS, CRITERIA

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prunescope.pruning.recover import RecoveryResult

log = logging.getLogger(__name__)

DEFAULT_MLP = 0.25
RECOVER_MODES = ("lora", "full")


@dataclass(frozen=True)
class ShrinkConfig(data.TextOptions, models.Placement):
    """Everything the shrink job needs; validated once, here, at the edge.

    Sizes (uniform over layers, so plain transformers loads the result): ``mlp`` removes that
    fraction of each layer's MLP channels (rounded so the kept width is a multiple of
    ``multiple_of``), ``kv_groups`` removes that many KV groups per layer (a kv head with its
    query heads), ``heads_per_group`` that many query heads from every kept group, and
    ``drop_layers`` that many whole layers. ``target_params`` (keep that fraction of the
    decoder-layer parameters) instead of ``mlp`` solves for the MLP width given the other sizes.
    With no size at all, ``mlp`` is 0.25.

    ``criterion`` scores units (magnitude, wanda-sp, flap); ``compensation`` (none, bias,
    lstsq) repairs the writer. ``recover_steps`` > 0 distils the shrunk model toward the dense
    one afterwards (``recover_mode`` lora or full). Calibration and evaluation options are
    those of :class:`~prunescope.data.TextOptions`.
    """

    model: str = models.DEFAULT_MODEL
    mlp: float | None = None
    kv_groups: int = 0
    heads_per_group: int = 0
    drop_layers: int = 0
    target_params: float | None = None
    criterion: str = "flap"
    compensation: str = "lstsq"
    multiple_of: int = 64
    damp: float = structured.DEFAULT_DAMP
    latency_rounds: int = 3
    prefill_tokens: int = 512
    decode_tokens: int = 64
    recover_steps: int = 0
    recover_mode: str = "lora"
    recover_lr: float | None = None
    recover_rank: int = 8
    recover_seqlen: int = 256
    recover_batch_size: int = 4
    save_dir: Path | None = None

    def __post_init__(self) -> None:
        self.check_text_options()
        self.check_placement()
        if self.offload and self.recover_steps:
            raise PrunescopeError(
                "--recover-steps trains the shrunk model against the dense one, both in memory; "
                "it cannot be combined with --offload (shrink offloaded, then recover the saved model)"
            )
        _choice("criterion", self.criterion, CRITERIA)
        _choice("compensation", self.compensation, COMPENSATIONS)
        _choice("recover mode", self.recover_mode, RECOVER_MODES)
        if self.mlp is not None and self.target_params is not None:
            raise PrunescopeError("--mlp and --target-params both set the MLP width; pass one of them")
        if self.mlp is not None and not 0.0 <= self.mlp < 1.0:
            raise PrunescopeError(f"--mlp is the fraction of MLP channels to remove, in [0, 1), got {self.mlp}")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise PrunescopeError(
                f"--target-params is the fraction of decoder-layer parameters to keep, in (0, 1), "
                f"got {self.target_params}"
            )
        if self.recover_steps:
            distributed.refuse("recovery (--recover-steps)")
        for name in ("kv_groups", "heads_per_group", "drop_layers", "latency_rounds", "recover_steps"):
            if getattr(self, name) < 0:
                raise PrunescopeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.multiple_of < 1:
            raise PrunescopeError(f"--multiple-of must be >= 1, got {self.multiple_of}")
        if not self.damp > 0:
            raise PrunescopeError(f"--damp must be > 0, got {self.damp}")
        if self.prefill_tokens < 1 or self.decode_tokens < 1:
            raise PrunescopeError("latency needs --prefill-tokens and --decode-tokens >= 1")
        if self.recover_rank < 1 or self.recover_seqlen < 2 or self.recover_batch_size < 1:
            raise PrunescopeError("recovery needs rank >= 1, seqlen >= 2 and batch size >= 1")

    @property
    def mlp_fraction(self) -> float:
        """The MLP fraction to remove (0.25 when no size option is given at all)."""
        if self.mlp is not None:
            return self.mlp
        others = self.kv_groups or self.heads_per_group or self.drop_layers or self.target_params
        return 0.0 if others else DEFAULT_MLP

    @property
    def needs_data(self) -> bool:
        """Whether calibration tokens are needed (magnitude without compensation needs none)."""
        return self.criterion != "magnitude" or self.compensation != "none" or self.drop_layers > 0


def _choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise PrunescopeError(f"unknown {what} {value!r}; choose one of {', '.join(valid)}")


@dataclass(frozen=True)
class ShrinkPlan:
    """The sizes checked against one model, before any heavy work.

    Attributes:
        family: the family's name.
        dense / shrunk: per-layer sizes before and after.
        dense_layers / drop_layers: layer count and how many go.
        kinds: unit kinds pruned in each layer, in order (``q`` before ``mlp``).
        bias_flags: config flags turned on for bias compensation.
        rounding: how the requested MLP size was rounded, in words.
    """

    family: str
    dense: Shape
    shrunk: Shape
    dense_layers: int
    drop_layers: int
    kinds: tuple[str, ...]
    bias_flags: tuple[str, ...]
    rounding: str


def _layer_params(model: nn.Module, family: Family, shape: Shape, bias_flags: tuple[str, ...]) -> int:
    """Exact parameters of one decoder layer of ``shape`` (biases the flags add included),
    counted on a layer built on the meta device from the shrunk config."""
    layer = models.adapter_for(model).layers(model)[0]
    config = families.shrunk_config(family, model.config, shape, [0], bias_flags)
    with torch.device("meta"):
        return sum(p.numel() for p in type(layer)(config, layer_idx=0).parameters())


def _mlp_for_target(
    config: ShrinkConfig, model: nn.Module, family: Family, heads: Shape, layers: int
) -> tuple[int, str]:
    """The widest multiple-of MLP width whose layers keep at most ``target_params`` of the dense
    decoder-layer parameters (after dropped layers, removed heads and compensation biases)."""
    dense = families.shape_of(family, model.config)
    structured.check_multiple(config.multiple_of, dense.intermediate, "MLP")
    budget = config.target_params * sum(p.numel() for p in models.adapter_for(model).layers(model).parameters())
    kept_layers = layers - config.drop_layers
    flags = _bias_flags(config, family, (Q, MLP) if heads != dense else (MLP,))
    step = config.multiple_of
    widths = [dense.intermediate, *range(step * (dense.intermediate // step), 0, -step)]  # widest first
    params = (kept_layers * _layer_params(model, family, replace(heads, intermediate=w), flags) for w in widths)
    width = next((w for w, n in zip(widths, params) if n <= budget), None)
    if width is None:
        raise PrunescopeError(
            f"--target-params {config.target_params:g} cannot be reached by shrinking the MLP "
            f"(it would need fewer than {step} channels); remove heads or layers too"
        )
    return width, f"MLP width {width} solved for --target-params {config.target_params:g} (multiple of {step})"


def _head_shape(config: ShrinkConfig, family: Family, dense: Shape) -> Shape:
    """The head counts after removing KV groups and query heads per group; checked."""
    if not (config.kv_groups or config.heads_per_group):
        return dense
    if family.no_heads_reason:
        raise PrunescopeError(family.no_heads_reason)
    assert dense.heads is not None and dense.kv_heads is not None
    per_group = dense.heads // dense.kv_heads
    if config.kv_groups >= dense.kv_heads:
        raise PrunescopeError(
            f"--kv-groups {config.kv_groups} must be below the model's {dense.kv_heads} KV groups "
            f"(removing all would leave no attention)"
        )
    if config.heads_per_group >= per_group:
        raise PrunescopeError(
            f"--heads-per-group {config.heads_per_group} must be below the {per_group} query heads "
            f"in each KV group"
        )
    kv = dense.kv_heads - config.kv_groups
    return replace(dense, heads=kv * (per_group - config.heads_per_group), kv_heads=kv)


def _bias_flags(config: ShrinkConfig, family: Family, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Config flags that give the compensated writers a bias; error where the family has none."""
    if config.compensation != "bias":
        return ()
    flags = []
    for kind in kinds:
        flag = family.bias_flag(kind)
        if flag is None:
            writer = "down_proj" if kind == MLP else "o_proj"
            raise PrunescopeError(
                f"{family.name} has no {writer} bias in plain transformers, so bias compensation of "
                f"its {'MLP' if kind == MLP else 'attention'} cannot be saved; use --compensation "
                f"lstsq or none"
            )
        if isinstance(flag, str):
            flags.append(flag)
    return tuple(dict.fromkeys(flags))


def make_plan(config: ShrinkConfig, model: nn.Module) -> ShrinkPlan:
    """Check every requested size against ``model`` and return the plan; nothing is changed.

    Raises:
        PrunescopeError: an unsupported family, a size that removes everything or nothing, a
            KV-group count not below the model's, ``multiple_of`` above the MLP width, every
            layer dropped, or bias compensation the family cannot save.
    """
    family = families.family_for(model)
    dense = families.shape_of(family, model.config)
    layers = len(models.adapter_for(model).layers(model))
    if config.drop_layers >= layers:
        raise PrunescopeError(f"--drop-layers {config.drop_layers} would drop every one of the {layers} layers")
    reason = family.no_drop_reason(model.config) if config.drop_layers else None
    if reason:
        raise PrunescopeError(reason)
    heads = _head_shape(config, family, dense)
    if config.target_params is not None:
        width, rounding = _mlp_for_target(config, model, family, heads, layers)
    elif config.mlp_fraction > 0:
        width = structured.kept_width(dense.intermediate, config.mlp_fraction, config.multiple_of, "MLP")
        rounding = (
            f"MLP {dense.intermediate} -> {width} channels: {config.mlp_fraction:g} requested, "
            f"{1 - width / dense.intermediate:.4f} removed (kept width a multiple of {config.multiple_of})"
        )
    else:
        width, rounding = dense.intermediate, "MLP kept whole"
    shrunk = replace(heads, intermediate=width)
    kinds = tuple(k for k, changed in ((Q, heads != dense), (MLP, width != dense.intermediate)) if changed)
    if not kinds and not config.drop_layers:
        raise PrunescopeError("these options remove nothing; pass --mlp, --kv-groups, --heads-per-group or --drop-layers")
    return ShrinkPlan(family.name, dense, shrunk, layers, config.drop_layers, kinds,
                      _bias_flags(config, family, kinds), rounding)


# --------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class UnitErrors:
    """Relative squared error of one writer's outputs on the calibration tokens after pruning,
    for each compensation (what each is worth in this layer)."""

    none: float
    bias: float
    lstsq: float


@dataclass
class _Choice:
    """What was decided for one kind of unit in one layer."""

    kept: dict[str, tuple[UnitLayout, torch.Tensor]]
    writer_cols: torch.Tensor
    new_cols: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    errors: UnitErrors | None = None


def _writer_cut(layout: UnitLayout) -> families.Cut:
    return next(c for c in layout.cuts if c.module == layout.writer and c.side == "in")


def _magnitudes(layer: nn.Module, layout: UnitLayout) -> torch.Tensor:
    """Squared norms of everything each unit owns: ``[count]``."""
    norms = {}
    for cut in layout.cuts:
        module = layer.get_submodule(cut.module)
        bias = getattr(module, "bias", None) if cut.side == "out" else None
        norms[(cut.module, cut.side)] = structured.feature_sq_norms(
            module.weight, bias, families.weight_dim(module, cut.side)
        )
    return structured.magnitude_scores(layout, norms)


def _scores(layer: nn.Module, layout: UnitLayout, criterion: str, stats: calib.InputStats | None) -> torch.Tensor:
    """``[count]`` scores of the units of ``layout`` (higher is kept)."""
    if criterion == "magnitude":
        return _magnitudes(layer, layout)
    assert stats is not None and stats.lin_sum is not None
    w = families.weight_matrix(layer.get_submodule(layout.writer))
    cols = structured.column_scores(criterion, w, stats.sq_sum, stats.lin_sum, stats.tokens)
    return structured.per_unit(cols.cpu(), _writer_cut(layout).offset, layout.count, layout.width)


def _select(
    layer: nn.Module, layouts: Mapping[str, UnitLayout], kind: str, criterion: str,
    stats: calib.InputStats | None, plan: ShrinkPlan,
) -> dict[str, tuple[UnitLayout, torch.Tensor]]:
    """Kept units: the best MLP channels, or GQA-aware heads (query heads with their kv heads)."""
    scores = _scores(layer, layouts[kind], criterion, stats)
    if kind == MLP:
        return {MLP: (layouts[MLP], structured.top_units(scores, plan.shrunk.intermediate))}
    assert plan.dense.kv_heads is not None and plan.shrunk.kv_heads is not None and plan.shrunk.heads is not None
    kv_own = _magnitudes(layer, layouts[KV]) if criterion == "magnitude" else None
    groups = structured.group_scores(scores, plan.dense.kv_heads, kv_own)
    per_group_dense = plan.dense.heads // plan.dense.kv_heads  # type: ignore[operator]
    per_group = plan.shrunk.heads // plan.shrunk.kv_heads
    kept_q, kept_kv = structured.select_heads(
        scores, groups, plan.dense.kv_heads - plan.shrunk.kv_heads, per_group_dense - per_group
    )
    return {Q: (layouts[Q], kept_q), KV: (layouts[KV], kept_kv)}


def _compensate(choice: _Choice, w: torch.Tensor, stats: calib.InputStats, method: str, damp: float) -> None:
    """Fill the compensation (new kept columns or a bias) and every compensation's error."""
    assert stats.xtx is not None and stats.lin_sum is not None
    cols, n = choice.writer_cols, stats.tokens
    gram = stats.xtx.double()  # [in, in], converted once for the four uses below
    removed = structured.removed_from(cols, w.shape[1])
    bias = structured.bias_compensation(w, stats.lin_sum / n, removed)
    refit = structured.lstsq_compensation(w, gram, cols, damp)
    choice.errors = UnitErrors(
        none=structured.output_error(w, gram, stats.lin_sum, n, cols),
        bias=structured.output_error(w, gram, stats.lin_sum, n, cols, bias=bias),
        lstsq=structured.output_error(w, gram, stats.lin_sum, n, cols, new_kept=refit),
    )
    if method == "bias":
        choice.bias = bias
    elif method == "lstsq":
        choice.new_cols = refit


@dataclass(frozen=True)
class LayerOutcome:
    """One decoder layer of the dense model in the report.

    Attributes:
        index: index in the dense model.
        new_index: index in the shrunk model (None if dropped).
        block_influence: ShortGPT's ``1 - cos(input, output)`` (None unless layers were dropped).
        attn_error / mlp_error: relative output errors of o_proj / down_proj for each
            compensation (None where that part was not pruned or no data was used).
    """

    index: int
    new_index: int | None
    block_influence: float | None = None
    attn_error: UnitErrors | None = None
    mlp_error: UnitErrors | None = None


@dataclass
class _LayerShrinker:
    """The per-layer step of the sequential loop for structured pruning."""

    model: nn.Module
    config: ShrinkConfig
    plan: ShrinkPlan
    layouts: Mapping[str, UnitLayout]
    new_config: Any
    layers_path: str
    errors: dict[int, dict[str, UnitErrors | None]] = field(default_factory=dict)

    def __call__(self, index: int, layer: nn.Module, inputs: calib.LayerInputs | None) -> None:
        kept: dict[str, tuple[UnitLayout, torch.Tensor]] = {}
        biases: dict[str, torch.Tensor] = {}
        writers = [self.layouts[kind].writer for kind in self.plan.kinds]
        with apply.output_biases(layer, writers, biases):
            for kind in self.plan.kinds:
                choice = self._choose(layer, kind, inputs)
                writer = self.layouts[kind].writer
                apply.set_writer_columns(layer, writer, choice.writer_cols, choice.new_cols)
                if choice.bias is not None:
                    biases[writer] = choice.bias
                kept.update(choice.kept)
                self.errors.setdefault(index, {})[kind] = choice.errors
        new = apply.shrink_layer(layer, kept, biases, self.new_config, index)
        apply.replace_layer(self.model, self.layers_path, index, new)

    def _choose(self, layer: nn.Module, kind: str, inputs: calib.LayerInputs | None) -> _Choice:
        layout = self.layouts[kind]
        stats = None
        if inputs is not None:
            module = {layout.writer: layer.get_submodule(layout.writer)}
            stats = calib.collect_stats(layer, module, inputs, hessian=True, means=True)[layout.writer]
        kept = _select(layer, self.layouts, kind, self.config.criterion, stats, self.plan)
        units = kept[kind if kind == MLP else Q][1]
        cols = structured.unit_columns(units, layout.width, _writer_cut(layout).offset)
        choice = _Choice(kept, cols)
        if stats is not None:
            writer = families.weight_matrix(layer.get_submodule(layout.writer))
            _compensate(choice, writer, stats, self.config.compensation, self.config.damp)
        return choice


# --------------------------------------------------------------------------- whole model


@torch.no_grad()
def block_influences(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, off: offload.OffloadedModel | None = None
) -> list[float]:
    """ShortGPT's block influence of every decoder layer of ``model`` on ``blocks`` (with
    ``off``, each layer's weights on the device only while it runs)."""
    adapter = models.adapter_for(model)
    with off.front() if off is not None else nullcontext():
        inputs = calib.capture_first_layer_inputs(model, adapter, blocks, batch_size)
    scores = []
    decoder = adapter.layers(model)
    for index in tqdm(range(len(decoder)), desc="block influence", unit="layer", leave=False):
        with off.layer(index) if off is not None else nullcontext():
            outputs = calib.run_layer(decoder[index], inputs)
        total, tokens = 0.0, 0
        for x_in, x_out in zip(inputs.hidden, outputs.hidden):
            s, n = structured.block_influence_sum(x_in, x_out)
            total, tokens = total + s, tokens + n
        total, tokens = distributed.sum_numbers(total, tokens)  # over processes, if launched in several
        scores.append(total / tokens)
        inputs = outputs
    return scores


def shrink_model(
    model: nn.Module, config: ShrinkConfig, plan: ShrinkPlan, calib_blocks: torch.Tensor | None,
    off: offload.OffloadedModel | None = None,
) -> tuple[nn.Module, tuple[LayerOutcome, ...], int]:
    """Drop layers, then shrink heads and channels layer by layer; returns the new model, the
    per-layer outcomes and the calibration bytes held. ``model`` is consumed (its layers are
    replaced); use the returned model.

    With ``off`` (``model`` is ``off.model``), each layer's weights are on the device only while
    it is visited, and each shrunk layer is written to ``off``'s sink as it is done; the
    returned model is the shrunk skeleton (weights on ``meta``)."""
    family = families.family_for(model)
    adapter = models.adapter_for(model)
    kept_layers = list(range(plan.dense_layers))
    influence: list[float | None] = [None] * plan.dense_layers
    if plan.drop_layers:
        assert calib_blocks is not None
        influence = list(block_influences(model, calib_blocks, config.calib_batch_size, off))
        dropped = set(sorted(range(plan.dense_layers), key=lambda i: influence[i])[: plan.drop_layers])
        kept_layers = [i for i in kept_layers if i not in dropped]
        log.info("dropping layers %s (lowest block influence)", sorted(dropped))
        config_after = families.shrunk_config(family, model.config, plan.dense, kept_layers)
        if off is not None:
            off.keep_layers(kept_layers, config_after)
            model = off.model
        else:
            model = apply.without_layers(model, adapter.layers_path, kept_layers, config_after)
    held, errors = 0, {}
    if plan.kinds:
        new_config = families.shrunk_config(
            family, model.config, plan.shrunk, list(range(len(kept_layers))), plan.bias_flags
        )
        step = _LayerShrinker(model, config, plan, family.layouts(model.config), new_config, adapter.layers_path)
        held = _shrink_layers(model, step, len(kept_layers), calib_blocks, config.calib_batch_size, off)
        errors = step.errors
        if off is not None:
            off.rebuild(new_config)
            model = off.model
        else:
            model = apply.rebuild_model(model, new_config)
    new_index = {old: new for new, old in enumerate(kept_layers)}
    outcomes = tuple(
        LayerOutcome(
            i, new_index.get(i), influence[i],
            errors.get(new_index.get(i, -1), {}).get(Q), errors.get(new_index.get(i, -1), {}).get(MLP),
        )
        for i in range(plan.dense_layers)
    )
    return model.eval(), outcomes, held


def _shrink_layers(
    model: nn.Module, step: _LayerShrinker, count: int, calib_blocks: torch.Tensor | None, batch_size: int,
    off: offload.OffloadedModel | None,
) -> int:
    """Run ``step`` on decoder layers ``0..count-1`` in order (sequentially calibrated when there
    are calibration windows); returns the calibration bytes held."""
    def visit(index: int) -> AbstractContextManager[Any]:
        return off.layer(index, write=True) if off is not None else nullcontext()

    if calib_blocks is not None:
        return calib.sequential(model, calib_blocks, step, count - 1, batch_size, "shrink",
                                visit=visit if off is not None else None,
                                front=off.front if off is not None else None)
    decoder = models.adapter_for(model).layers(model)
    for index in tqdm(range(count), desc="shrink", unit="layer", leave=False):
        with visit(index):
            step(index, decoder[index], None)
    return 0


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class LatencyFigures:
    """Dense and shrunk latency, measured side by side (interleaved rounds, medians)."""

    prefill_tokens: int
    decode_tokens: int
    rounds: int
    device: str
    threads: int
    dense_prefill_seconds: float
    shrunk_prefill_seconds: float
    dense_decode_tokens_per_second: float
    shrunk_decode_tokens_per_second: float
    prefill_speedup: float
    decode_speedup: float


@dataclass(frozen=True)
class ShrinkResult:
    """What the shrink job measured; the canonical content of ``report.json``."""

    model: str
    family: str
    criterion: str
    compensation: str
    damp: float
    multiple_of: int
    requested: Mapping[str, Any]
    rounding: str
    dense_shape: Shape
    shrunk_shape: Shape
    dense_layers: int
    shrunk_layers: int
    dropped_layers: tuple[int, ...]
    config_changes: Mapping[str, tuple[Any, Any]]
    dense_params: int
    shrunk_params: int
    dense_layer_params: int
    shrunk_layer_params: int
    layer_params_kept: float
    dense_weight_bytes: int
    shrunk_weight_bytes: int
    dense_ppl: float | None
    pruned_ppl: float | None
    recovered_ppl: float | None
    eval_text: str
    eval_tokens: int
    eval_seqlen: int
    calib_text: str | None
    calib_samples: int
    calib_seqlen: int
    calib_activation_bytes: int
    seed: int
    prune_seconds: float
    eval_seconds: float
    latency: LatencyFigures | None
    recovery: "RecoveryResult | None"
    layers: tuple[LayerOutcome, ...]
    saved: Mapping[str, Any] | None = None
    offloaded: bool = False
    peak_rss_bytes: int | None = None


def _decoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in models.adapter_for(model).layers(model).parameters())


def _config_changes(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """Config keys whose values differ between the dense and the shrunk model."""
    old, new = before.to_dict(), after.to_dict()
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _latency(dense: nn.Module, shrunk: nn.Module, config: ShrinkConfig) -> LatencyFigures:
    vocab = shrunk.get_input_embeddings().weight.shape[0]
    figures = evaluate.compare_latency(
        {"dense": dense, "shrunk": shrunk}, vocab, config.prefill_tokens, config.decode_tokens,
        config.latency_rounds, seed=config.seed,
    )
    d, s = figures["dense"], figures["shrunk"]
    return LatencyFigures(
        config.prefill_tokens, config.decode_tokens, config.latency_rounds,
        str(next(shrunk.parameters()).device), torch.get_num_threads(),
        d.prefill_seconds, s.prefill_seconds, d.decode_tokens_per_second, s.decode_tokens_per_second,
        d.prefill_seconds / s.prefill_seconds, s.decode_tokens_per_second / d.decode_tokens_per_second,
    )


def save_model(model: nn.Module, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Write ``model`` (``save_pretrained``) and its tokenizer to ``folder`` atomically."""
    from prunescope import atomic

    t0 = time.perf_counter()
    with atomic.new_folder(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    log.info("saved the shrunk model to %s (%.1f MB of safetensors)", folder, weights / 2**20)
    return {"path": str(folder), "safetensors_bytes": weights, "save_seconds": time.perf_counter() - t0}


def _recover(
    model: nn.Module, teacher: nn.Module, tokenizer: "PreTrainedTokenizerBase", config: ShrinkConfig
) -> "RecoveryResult":
    from prunescope.pruning import recover

    tokens = data.tokenize(tokenizer, data.load_text(config.calib_text))
    windows = data.calibration_blocks(
        tokens, config.recover_steps * config.recover_batch_size, config.recover_seqlen, config.seed + 1
    )
    return recover.distill(
        model, teacher, windows, batch_size=config.recover_batch_size, mode=config.recover_mode,
        lr=config.recover_lr, rank=config.recover_rank, seed=config.seed,
    )


@dataclass(frozen=True)
class _Dense:
    """What the dense model was, taken before it is consumed."""

    config: Any
    params: int
    layer_params: int
    weight_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> "_Dense":
        return cls(copy.deepcopy(model.config), sum(p.numel() for p in model.parameters()),
                   _decoder_params(model), evaluate.parameter_bytes(model))


def run_shrink(
    config: ShrinkConfig, model: nn.Module | None = None, tokenizer: "PreTrainedTokenizerBase | None" = None
) -> tuple[ShrinkResult, nn.Module]:
    """Shrink ``config.model`` (or the given model, which is consumed) and measure it.

    With ``config.offload`` (or, when it is None, a local model that does not fit the device's
    free memory) the model is never in memory whole: see :func:`run_shrink_offloaded`.

    Returns the result and the shrunk model (a new object; ``save_pretrained`` it anywhere).
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both a model and its tokenizer, or neither (config.model is loaded)")
    if model is None and offload.wanted(config.model, config):
        return run_shrink_offloaded(replace(config, offload=True))
    if model is None or tokenizer is None:
        log.info("loading model %s", config.model)
        model, tokenizer = config.load_model(config.model)
    plan = make_plan(config, model)
    log.info("%s: %s", plan.family, plan.rounding)
    calib_blocks = config.calibration_windows(tokenizer) if config.needs_data else None
    blocks = config.evaluation_windows(tokenizer)
    before = _Dense.of(model)
    t0 = time.perf_counter()
    dense_ppl = evaluate.perplexity_or_none(model, blocks, config.eval_batch_size, "dense perplexity")
    eval_seconds = time.perf_counter() - t0
    dense = copy.deepcopy(model) if config.latency_rounds or config.recover_steps else None

    t0 = time.perf_counter()
    model, outcomes, held = shrink_model(model, config, plan, calib_blocks)
    prune_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned_ppl = evaluate.perplexity_or_none(model, blocks, config.eval_batch_size, "shrunk perplexity")
    eval_seconds += time.perf_counter() - t0

    recovery, recovered_ppl = None, None
    if config.recover_steps:
        assert dense is not None
        recovery = _recover(model, dense, tokenizer, config)
        recovered_ppl = evaluate.perplexity_or_none(model, blocks, config.eval_batch_size, "recovered perplexity")
    latency = _latency(dense, model, config) if dense is not None and config.latency_rounds else None
    del dense
    saved = save_model(model, tokenizer, config.save_dir) if config.save_dir and distributed.is_main() else None
    result = _result(
        config, plan, before, model, outcomes, blocks, calib_blocks,
        dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, recovered_ppl=recovered_ppl, calib_activation_bytes=held,
        prune_seconds=prune_seconds, eval_seconds=eval_seconds, latency=latency, recovery=recovery, saved=saved,
    )
    return result, model


def run_shrink_offloaded(config: ShrinkConfig) -> tuple[ShrinkResult, nn.Module]:
    """The shrink job with one decoder layer in memory at a time (:mod:`prunescope.offload`).

    Weights are read from the checkpoint's safetensors shards; each shrunk layer is written as
    its own shard of the new model (to ``config.save_dir``, else to a scratch folder in
    ``config.offload_folder``); perplexity runs through the same per-layer loop. Latency, which
    needs both models in memory, is not measured.
    """
    from prunescope.pruning.job import peak_rss_bytes

    device = devices.resolve_device(config.device)
    folder = offload.checkpoint_folder(config.model)
    dtype = offload.dtype_for(folder, config.dtype, device)
    save_dir = config.save_dir if distributed.is_main() else None
    if config.latency_rounds:
        log.info("latency is not measured with --offload: it needs the dense and shrunk models in memory")
    with offload.open_model(folder, dtype, device, save_dir, config.offload_folder) as (off, tokenizer):
        plan = make_plan(config, off.model)
        log.info("%s: %s", plan.family, plan.rounding)
        calib_blocks = config.calibration_windows(tokenizer) if config.needs_data else None
        blocks = config.evaluation_windows(tokenizer)
        offload.release_freed_memory()  # what tokenizing the whole text took
        before = _Dense.of(off.model)
        run = off.measured(lambda: shrink_model(off.model, config, plan, calib_blocks, off), tokenizer, blocks,
                           config.eval_batch_size, "shrunk")
        model, outcomes, held = run.value
        saved = None if save_dir is None else {
            "path": str(save_dir), "safetensors_bytes": off.sink.nbytes(), "save_seconds": run.save_seconds,
            "shards": len(set(off.sink.weight_map.values())),
        }
    result = _result(
        config, plan, before, model, outcomes, blocks, calib_blocks,
        dense_ppl=run.dense_ppl, pruned_ppl=run.changed_ppl, recovered_ppl=None, calib_activation_bytes=held,
        prune_seconds=run.work_seconds, eval_seconds=run.eval_seconds, latency=None, recovery=None, saved=saved,
        offloaded=True, peak_rss_bytes=peak_rss_bytes(),
    )
    return result, model


def _result(
    config: ShrinkConfig, plan: ShrinkPlan, dense: _Dense, model: nn.Module, outcomes: tuple[LayerOutcome, ...],
    blocks: torch.Tensor | None, calib_blocks: torch.Tensor | None, **measured: Any,
) -> ShrinkResult:
    """The :class:`ShrinkResult` from the config, the plan, the dense figures, the shrunk model
    and ``measured`` (perplexities, times, latency, recovery, saved folder)."""
    shrunk_layer_params = _decoder_params(model)
    return ShrinkResult(
        model=config.model, family=plan.family, criterion=config.criterion,
        compensation=config.compensation, damp=config.damp, multiple_of=config.multiple_of,
        requested={"mlp": config.mlp_fraction if config.target_params is None else None,
                   "kv_groups": config.kv_groups, "heads_per_group": config.heads_per_group,
                   "drop_layers": config.drop_layers, "target_params": config.target_params},
        rounding=plan.rounding, dense_shape=plan.dense, shrunk_shape=plan.shrunk,
        dense_layers=plan.dense_layers, shrunk_layers=plan.dense_layers - plan.drop_layers,
        dropped_layers=tuple(o.index for o in outcomes if o.new_index is None),
        config_changes=_config_changes(dense.config, model.config),
        dense_params=dense.params, shrunk_params=sum(p.numel() for p in model.parameters()),
        dense_layer_params=dense.layer_params, shrunk_layer_params=shrunk_layer_params,
        layer_params_kept=shrunk_layer_params / dense.layer_params,
        dense_weight_bytes=dense.weight_bytes, shrunk_weight_bytes=evaluate.parameter_bytes(model),
        eval_text=config.eval_text, eval_tokens=0 if blocks is None else blocks.numel(),
        eval_seqlen=config.eval_seqlen,
        calib_text=config.calib_text if calib_blocks is not None else None,
        calib_samples=config.calib_samples if calib_blocks is not None else 0,
        calib_seqlen=config.calib_seqlen if calib_blocks is not None else 0,
        seed=config.seed, layers=outcomes, **measured,
    )
