"""The ``prunescope activations`` job: profile a model's activation sparsity and, on request,
swap its activations (relufication) and sweep TEAL-style threshold sparsity.

``run_activations(config)`` returns a frozen :class:`ActivationsResult` from which JSON, Markdown
and plots are rendered. Order of work: profile the model as loaded; then the threshold sweep on
that model (each target from the same dense weights, hooks removed after); then the swap, with
perplexity and a second profile after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunescope import data, evaluate, models
from prunescope.activations import threshold
from prunescope.activations.profiler import (
    DEFAULT_EPS, DEFAULT_SAMPLE_EVERY, DEFAULT_TOKEN_EPS, Profile, profile, validate_profile_args,
)
from prunescope.activations.swap import check_swap, swap_activations
from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_TARGETS = (0.0, 0.25, 0.4, 0.5, 0.65)


@dataclass(frozen=True)
class ActivationsConfig(models.Placement):
    """Options of the activations job; validated once, here."""

    model: str = models.DEFAULT_MODEL
    text: str = data.DEFAULT_TEXT
    tokens: int = 8192
    seqlen: int = 512
    batch_size: int = 4
    eps: tuple[float, ...] = DEFAULT_EPS
    token_eps: float = DEFAULT_TOKEN_EPS
    sample_every: int = DEFAULT_SAMPLE_EVERY
    swap: str | None = None
    thresholds: tuple[float, ...] = ()
    threshold_include: tuple[str, ...] = ()
    calib_text: str = data.DEFAULT_TEXT
    calib_tokens: int = 8192
    eval_text: str = data.DEFAULT_TEXT
    eval_tokens: int = 16384
    eval_seqlen: int = 512

    def __post_init__(self) -> None:
        self.check_placement()
        validate_profile_args(self.eps, self.token_eps, self.sample_every)
        if self.seqlen < 2 or self.eval_seqlen < 2 or self.batch_size < 1:
            raise PrunescopeError(
                f"seqlen and eval seqlen must be >= 2 and batch >= 1, got {self.seqlen}, "
                f"{self.eval_seqlen} and {self.batch_size}")
        for name, n, seq in (("tokens", self.tokens, self.seqlen), ("eval tokens", self.eval_tokens, self.eval_seqlen),
                             ("calib tokens", self.calib_tokens, self.seqlen)):
            if n < seq:
                raise PrunescopeError(f"{name} ({n}) must be at least one window of {seq} tokens")
        if self.swap is not None:
            check_swap(self.swap)
        for t in self.thresholds:
            threshold.check_target(t)

    @property
    def needs_eval(self) -> bool:
        return self.swap is not None or bool(self.thresholds)


@dataclass(frozen=True)
class ThresholdPoint:
    """Perplexity at one target sparsity of the thresholded Linear inputs."""

    target: float
    actual: float  # fraction of thresholded inputs that were zero on the evaluation text
    ppl: float
    thresholds: dict[str, float]  # Linear name -> |x| threshold


@dataclass(frozen=True)
class ThresholdSweep:
    """TEAL-style threshold sparsity: calibration, evaluation, and one point per target."""

    linears: tuple[str, ...]
    calib_text: str
    calib_tokens: int
    eval_text: str
    eval_tokens: int
    eval_seqlen: int
    points: tuple[ThresholdPoint, ...]


@dataclass(frozen=True)
class SwapResult:
    """Perplexity and activation sparsity before and after replacing every activation."""

    to: str
    replaced: dict[str, str]  # module name -> family before
    eval_text: str
    eval_tokens: int
    ppl_before: float
    ppl_after: float
    profile_after: Profile


@dataclass(frozen=True)
class ActivationsResult:
    """The canonical content of ``report.json``."""

    model: str
    model_info: dict[str, Any]
    text: str
    profile: Profile
    threshold: ThresholdSweep | None = None
    swap: SwapResult | None = None


def token_blocks(tokenizer: "PreTrainedTokenizerBase", source: str, n_tokens: int, seqlen: int,
                 what: str) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``source`` as ``[n_tokens // seqlen, seqlen]`` windows.

    Raises:
        PrunescopeError: the text holds fewer than ``n_tokens`` tokens.
    """
    tokens = data.tokenize(tokenizer, data.load_text(source))
    if tokens.numel() < n_tokens:
        raise PrunescopeError(
            f"{what} text {source!r} has {tokens.numel()} tokens, fewer than the {n_tokens} requested; "
            "pass a longer text or fewer tokens")
    return data.eval_blocks(tokens, seqlen, n_tokens)


def threshold_sweep(model: nn.Module, tokenizer: "PreTrainedTokenizerBase", config: ActivationsConfig,
                    eval_blocks: torch.Tensor) -> ThresholdSweep:
    """Calibrate per-Linear thresholds once, then evaluate perplexity at every target."""
    targets = threshold.default_targets(model, config.threshold_include)
    calib = token_blocks(tokenizer, config.calib_text, config.calib_tokens, config.seqlen, "calibration")
    hists = threshold.calibrate_histograms(model, targets, calib, config.batch_size)
    points = []
    for target in config.thresholds:
        ths = threshold.thresholds_for(hists, target)
        counter = threshold.SparsityCounter()
        with threshold.thresholded(model, ths, counter):
            ppl = evaluate.perplexity(model, eval_blocks, config.batch_size, desc=f"threshold {target:g}")
        log.info("threshold sparsity %.0f%% (reached %.1f%%): perplexity %.3f",
                 100 * target, 100 * counter.sparsity, ppl)
        points.append(ThresholdPoint(target, counter.sparsity, ppl, ths))
    return ThresholdSweep(tuple(targets), config.calib_text, calib.numel(), config.eval_text,
                          eval_blocks.numel(), config.eval_seqlen, tuple(points))


def _profile(model: nn.Module, blocks: torch.Tensor, config: ActivationsConfig) -> Profile:
    return profile(model, blocks, config.eps, config.token_eps, config.sample_every, config.batch_size)


def run_activations(config: ActivationsConfig, model: nn.Module | None = None,
                    tokenizer: "PreTrainedTokenizerBase | None" = None) -> ActivationsResult:
    """Profile ``config.model`` (or the given model), then the optional threshold sweep and swap."""
    if model is None or tokenizer is None:
        log.info("loading model %s", config.model)
        model, tokenizer = config.load_model(config.model)
    blocks = token_blocks(tokenizer, config.text, config.tokens, config.seqlen, "profiling")
    eval_blocks = (token_blocks(tokenizer, config.eval_text, config.eval_tokens, config.eval_seqlen, "evaluation")
                   if config.needs_eval else None)
    if config.thresholds:
        threshold.default_targets(model, config.threshold_include)  # fail before the long work
    before = _profile(model, blocks, config)
    sweep = threshold_sweep(model, tokenizer, config, eval_blocks) if config.thresholds else None
    swap = None
    if config.swap is not None:
        assert eval_blocks is not None
        ppl_before = next((p.ppl for p in sweep.points if p.target == 0.0), None) if sweep else None
        if ppl_before is None:
            ppl_before = evaluate.perplexity(model, eval_blocks, config.batch_size, desc="perplexity before swap")
        replaced = swap_activations(model, config.swap)
        ppl_after = evaluate.perplexity(model, eval_blocks, config.batch_size, desc=f"perplexity with {config.swap}")
        log.info("swap to %s: perplexity %.3f -> %.3f", config.swap, ppl_before, ppl_after)
        swap = SwapResult(config.swap, replaced, config.eval_text, eval_blocks.numel(), ppl_before, ppl_after,
                          _profile(model, blocks, config))
    return ActivationsResult(config.model, models.describe(model), config.text, before, sweep, swap)
