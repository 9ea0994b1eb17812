"""Per-module spectra of an adapter, summaries per module type and per layer, and paired
comparisons between module types across layers (Wilcoxon signed-rank)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from prunescope.errors import PrunescopeError
from prunescope.lora.io import Adapter, LoraBlock, find_adapters, load_adapter
from prunescope.lora.spectrum import (
    batched_singular_values,
    lowrank_singular_values,
    spectrum_stats,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleSpectrum:
    """Spectrum and statistics of one ΔW = scale * B @ A."""

    adapter: str
    name: str
    layer: int | None
    module_type: str
    kind: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    scale: float
    singular_values: tuple[float, ...]
    effective_rank: float
    stable_rank: float
    energy_rank_90: int
    energy_rank_95: int
    energy_rank_99: int
    spectral_norm: float
    frobenius_norm: float
    top1_energy: float


@dataclass(frozen=True)
class TypeSummary:
    """Statistics of one module type over layers (medians, and the effective-rank spread)."""

    adapter: str
    module_type: str
    count: int
    rank: int
    effective_rank_median: float
    effective_rank_q1: float
    effective_rank_q3: float
    effective_rank_min: float
    effective_rank_max: float
    stable_rank_median: float
    energy_rank_90_median: float
    energy_rank_95_median: float
    energy_rank_99_median: float
    spectral_norm_median: float
    frobenius_norm_median: float
    top1_energy_median: float


@dataclass(frozen=True)
class LayerSummary:
    """Statistics of one layer over its module types."""

    adapter: str
    layer: int
    count: int
    effective_rank_mean: float
    stable_rank_mean: float
    frobenius_norm_total: float


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of effective rank, ``type_a`` minus ``type_b``, over matched layers."""

    adapter: str
    type_a: str
    type_b: str
    n_pairs: int
    median_difference: float
    a_lower: int
    b_lower: int
    statistic: float | None
    p_value: float | None
    sentence: str


@dataclass(frozen=True)
class AdapterOverview:
    """One analysed adapter: where it is, its size, and what the reader must know about it."""

    name: str
    path: str
    modules: int
    parameters: int
    r: int
    lora_alpha: float
    use_rslora: bool
    notes: tuple[str, ...]


@dataclass(frozen=True)
class AdapterFailure:
    """An adapter that could not be read, and why."""

    path: str
    error: str


@dataclass(frozen=True)
class SpectrumReport:
    """The result of ``prunescope lora spectrum``: every module of every adapter, summaries,
    comparisons, and the adapters that failed to load."""

    adapters: tuple[AdapterOverview, ...]
    modules: tuple[ModuleSpectrum, ...]
    type_summaries: tuple[TypeSummary, ...]
    layer_summaries: tuple[LayerSummary, ...]
    comparisons: tuple[Comparison, ...]
    failures: tuple[AdapterFailure, ...]
    seconds: float


def module_spectrum(
    block: LoraBlock, adapter: str = "", sigma: torch.Tensor | None = None
) -> ModuleSpectrum:
    """Spectrum of one block via the QR/core-SVD route (ΔW is never formed).

    ``sigma`` passes singular values already computed (e.g. by :func:`batched_singular_values`).
    """
    if sigma is None:
        sigma = lowrank_singular_values(block.B, block.A, block.scale)
    stats = spectrum_stats(sigma)
    return ModuleSpectrum(
        adapter=adapter, name=block.name, layer=block.layer, module_type=block.module_type,
        kind=block.kind, shape=block.shape, rank=block.rank, alpha=block.alpha, scale=block.scale,
        singular_values=tuple(float(s) for s in sigma), **vars(stats),
    )


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def type_summaries(modules: Sequence[ModuleSpectrum]) -> tuple[TypeSummary, ...]:
    """One :class:`TypeSummary` per (adapter, module type), in order of first appearance."""
    groups: dict[tuple[str, str], list[ModuleSpectrum]] = {}
    for m in modules:
        groups.setdefault((m.adapter, m.module_type), []).append(m)
    out = []
    for (adapter, mtype), ms in groups.items():
        eff = [m.effective_rank for m in ms]
        q1, med, q3 = _quantiles(eff)
        med_of = lambda attr: statistics.median(getattr(m, attr) for m in ms)  # noqa: E731
        out.append(TypeSummary(
            adapter=adapter, module_type=mtype, count=len(ms), rank=max(m.rank for m in ms),
            effective_rank_median=med, effective_rank_q1=q1, effective_rank_q3=q3,
            effective_rank_min=min(eff), effective_rank_max=max(eff),
            stable_rank_median=med_of("stable_rank"), energy_rank_90_median=med_of("energy_rank_90"),
            energy_rank_95_median=med_of("energy_rank_95"), energy_rank_99_median=med_of("energy_rank_99"),
            spectral_norm_median=med_of("spectral_norm"), frobenius_norm_median=med_of("frobenius_norm"),
            top1_energy_median=med_of("top1_energy"),
        ))
    return tuple(out)


def layer_summaries(modules: Sequence[ModuleSpectrum]) -> tuple[LayerSummary, ...]:
    """One :class:`LayerSummary` per (adapter, layer) for modules that sit in a numbered layer."""
    groups: dict[tuple[str, int], list[ModuleSpectrum]] = {}
    for m in modules:
        if m.layer is not None:
            groups.setdefault((m.adapter, m.layer), []).append(m)
    return tuple(
        LayerSummary(
            adapter=adapter, layer=layer, count=len(ms),
            effective_rank_mean=statistics.fmean(m.effective_rank for m in ms),
            stable_rank_mean=statistics.fmean(m.stable_rank for m in ms),
            frobenius_norm_total=sum(m.frobenius_norm**2 for m in ms) ** 0.5,
        )
        for (adapter, layer), ms in sorted(groups.items())
    )


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "no test possible"
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 1e-4"


def paired_comparison(
    pairs: Sequence[tuple[float, float]], type_a: str, type_b: str, adapter: str = "",
    unit: str = "layers",
) -> Comparison:
    """Wilcoxon signed-rank test of ``a - b`` over matched pairs (e.g. layers, or seed x layer).

    The p-value is two-sided; with fewer than 2 non-zero differences no test is possible (None).
    """
    from scipy.stats import wilcoxon

    diffs = [a - b for a, b in pairs]
    n = len(diffs)
    if n == 0:
        raise PrunescopeError(f"no matched {unit} between {type_a} and {type_b}")
    med = statistics.median(diffs)
    a_lower, b_lower = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    stat = p = None
    if sum(d != 0 for d in diffs) >= 2:
        res = wilcoxon(diffs, alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    direction = "lower" if med < 0 else "higher" if med > 0 else "the same"
    sentence = (
        f"{type_a} has a {direction} effective rank than {type_b} "
        f"(median difference {med:+.3g}; lower in {a_lower} of {n} {unit}, higher in {b_lower}; "
        f"Wilcoxon signed-rank {_fmt_p(p)})."
    )
    if med == 0:
        sentence = sentence.replace("has a the same effective rank than", "has the same median effective rank as")
    return Comparison(adapter, type_a, type_b, n, med, a_lower, b_lower, stat, p, sentence)


def _type_order(types: Sequence[str]) -> list[str]:
    """v_proj first, then the other attention projections, then the rest (stable order)."""
    preferred = ["v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return sorted(dict.fromkeys(types), key=lambda t: preferred.index(t) if t in preferred else len(preferred))


def compare_types(modules: Sequence[ModuleSpectrum], key: str = "layer") -> tuple[Comparison, ...]:
    """Every pair of module types of one adapter that share at least 2 layers, paired by layer."""
    by_type: dict[str, dict[Hashable, float]] = {}
    for m in modules:
        if m.layer is not None:
            by_type.setdefault(m.module_type, {})[m.layer] = m.effective_rank
    adapter = modules[0].adapter if modules else ""
    out = []
    for a, b in combinations(_type_order(list(by_type)), 2):
        common = sorted(set(by_type[a]) & set(by_type[b]))
        if len(common) >= 2:
            pairs = [(by_type[a][k], by_type[b][k]) for k in common]
            out.append(paired_comparison(pairs, a, b, adapter=adapter))
    return tuple(out)


def analyse_adapter(
    adapter: Adapter, label: str | None = None
) -> tuple[AdapterOverview, tuple[ModuleSpectrum, ...]]:
    """Spectra of every block of one loaded adapter, labelled ``label`` (default: folder name)."""
    label = label or adapter.name
    sigmas = batched_singular_values([(b.B, b.A, b.scale) for b in adapter.blocks])
    modules = tuple(module_spectrum(b, label, s) for b, s in zip(adapter.blocks, sigmas))
    cfg = adapter.config
    overview = AdapterOverview(
        name=label, path=str(adapter.path), modules=len(modules),
        parameters=sum(b.parameters for b in adapter.blocks), r=int(cfg["r"]),
        lora_alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora", False)),
        notes=adapter.notes,
    )
    return overview, modules


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Adapter labels: folder names, with the parent prepended when two names collide."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def analyse_paths(paths: Sequence[str | Path]) -> SpectrumReport:
    """Analyse every adapter named by ``paths``; a bad adapter is recorded, the rest go on.

    Raises:
        PrunescopeError: when no adapter at all could be analysed (the message lists why).
    """
    start = time.perf_counter()
    folders = find_adapters(paths)
    overviews, modules, failures = [], [], []
    for folder, label in zip(folders, _unique_names(folders)):
        try:
            adapter = load_adapter(folder)
        except PrunescopeError as exc:
            log.debug("skipping %s: %s", folder, exc)  # run_spectrum names every failure at the end
            failures.append(AdapterFailure(str(folder), str(exc)))
            continue
        overview, mods = analyse_adapter(adapter, label)
        overviews.append(overview)
        modules.extend(mods)
    if not overviews:
        raise PrunescopeError("no adapter could be analysed: " + "; ".join(f.error for f in failures))
    comparisons = tuple(c for o in overviews for c in compare_types([m for m in modules if m.adapter == o.name]))
    return SpectrumReport(
        adapters=tuple(overviews), modules=tuple(modules), type_summaries=type_summaries(modules),
        layer_summaries=layer_summaries(modules), comparisons=comparisons, failures=tuple(failures),
        seconds=time.perf_counter() - start,
    )
