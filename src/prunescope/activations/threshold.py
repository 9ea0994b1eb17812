"""Threshold (TEAL-style) activation sparsity: zero the inputs of chosen Linear layers whose
magnitude is below a per-layer threshold calibrated for a target sparsity.

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models") observes
that the hidden states entering a decoder's Linear layers are zero-centred and unimodal, so
magnitude thresholding loses little, and sets, per tensor, the threshold at the quantile of
``|x|`` that gives the target sparsity on calibration text. This module implements the uniform
variant (the same target for every chosen Linear; TEAL's greedy per-layer allocation is not
implemented). Calibration streams ``log10|x|`` into a fine fixed-bin histogram per Linear
(bounded memory), so the thresholds for all targets come from one calibration pass.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import models
from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

LOG_MIN, LOG_MAX, LOG_BINS = -10.0, 4.0, 5600  # log10|x| histogram: 0.0025-decade bins


def check_target(sparsity: float) -> None:
    """A target sparsity must lie in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise PrunescopeError(f"target sparsity must be in [0, 1), e.g. 0.5 for 50%, got {sparsity!r}")


def default_targets(model: nn.Module, include: tuple[str, ...] = ()) -> list[str]:
    """The Linear layers to threshold: all inside the decoder layers (lm_head stays dense),
    narrowed by ``include`` globs."""
    prefix = models.adapter_for(model).layers_path + "."
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    if not names:
        raise PrunescopeError(f"no Linear layer inside {prefix}* matches --threshold-include {list(include)}")
    return names


@torch.no_grad()
def calibrate_histograms(
    model: nn.Module, targets: list[str], blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Per Linear, the histogram (``[LOG_BINS + 1]``, last bin = exact zeros) of ``log10|x|`` of its input."""
    hists = {n: torch.zeros(LOG_BINS + 1, dtype=torch.float64) for n in targets}
    last: list = [None, None]  # input, its histogram: q/k/v (gate/up) read the same tensor

    def histogram(x: torch.Tensor) -> torch.Tensor:
        a = x.detach().float().abs().flatten()  # [T * in]
        zeros = a.numel() - int(torch.count_nonzero(a))
        h = torch.zeros(LOG_BINS + 1, dtype=torch.float64)
        h[:-1] = torch.histc(a.clamp_min(1e-30).log10_(), LOG_BINS, LOG_MIN, LOG_MAX).double().cpu()  # [LOG_BINS] on the CPU
        huge = int(torch.count_nonzero(a >= 10**LOG_MAX))
        h[LOG_BINS - 1] += huge  # beyond the range: top bin
        h[0] += a.numel() - int(h.sum()) - zeros  # tiny non-zeros (below 1e-10): lowest bin
        h[-1] = zeros
        return h

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if last[0] is not args[0]:
                last[:] = [args[0], histogram(args[0])]
            hists[name] += last[1]
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in targets]
    device = models.input_device(model)
    try:
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="calibrate thresholds",
                          disable=not progress, leave=False):
            model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None]
    return hists


def threshold_for(hist: torch.Tensor, sparsity: float) -> float:
    """The ``|x|`` below which a ``sparsity`` fraction of the calibration values lie.

    Exact zeros count as below any threshold; within a bin the quantile is interpolated
    linearly in log space. Sparsity 0 gives threshold 0 (nothing changes).
    """
    check_target(sparsity)
    total = float(hist.sum())
    need = sparsity * total - float(hist[-1])  # values that must come from the non-zero bins
    if sparsity == 0.0 or need <= 0:
        return 0.0
    cum = torch.cumsum(hist[:-1], 0)  # [LOG_BINS]
    i = int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype)))
    i = min(i, LOG_BINS - 1)
    below = float(cum[i - 1]) if i > 0 else 0.0
    frac = (need - below) / max(float(hist[i]), 1e-12)
    width = (LOG_MAX - LOG_MIN) / LOG_BINS
    return 10 ** (LOG_MIN + (i + min(max(frac, 0.0), 1.0)) * width)


def thresholds_for(hists: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Per-Linear thresholds for one target sparsity."""
    return {n: threshold_for(h, sparsity) for n, h in hists.items()}


class SparsityCounter:
    """Counts zeros produced by the threshold hooks (the sparsity actually reached)."""

    def __init__(self) -> None:
        self.zeros = 0
        self.total = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@contextmanager
def thresholded(
    model: nn.Module, thresholds: Mapping[str, float], counter: SparsityCounter | None = None
) -> Iterator[None]:
    """Within the block, each named Linear sees its input with ``|x| < threshold`` set to zero."""

    last: list = [None, None, None]  # input, threshold, output: q/k/v (gate/up) share one input

    def make_hook(t: float):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [..., in]
            if last[0] is x and last[1] == t:
                y = last[2]
            else:  # hardshrink: one fused pass, zero where |x| <= t
                y = torch.nn.functional.hardshrink(x, t) if t > 0 else x
                last[:] = [x, t, y]
            if counter is not None:
                counter.total += y.numel()
                counter.zeros += y.numel() - int(torch.count_nonzero(y))
            return (y, *args[1:])
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(t))
               for n, t in thresholds.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        last[:] = [None, None, None]
