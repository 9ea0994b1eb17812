"""Render LoRA spectrum and compression results: Markdown and PNG plots (from the result only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure

if TYPE_CHECKING:
    from prunescope.lora.analysis import ModuleSpectrum, SpectrumReport
    from prunescope.lora.compress import CompressResult


def _types(modules: Sequence["ModuleSpectrum"]) -> list[str]:
    from prunescope.lora.analysis import _type_order

    return _type_order([m.module_type for m in modules])


def adapters_table(report: "SpectrumReport") -> str:
    """One row per adapter: size and median effective rank of every module type (the comparison)."""
    types = _types(report.modules)
    med = {(t.adapter, t.module_type): t.effective_rank_median for t in report.type_summaries}
    rows = [
        [a.name, a.modules, a.r, a.lora_alpha, a.parameters, *[med.get((a.name, t), float("nan")) for t in types]]
        for a in report.adapters
    ]
    headers = ["adapter", "modules", "r", "alpha", "parameters", *[f"eff. rank {t}" for t in types]]
    return markdown_table(headers, rows, floatfmt=".3g")


def type_table(report: "SpectrumReport") -> str:
    """Per (adapter, module type): medians over layers."""
    rows = [
        [t.adapter, t.module_type, t.count, t.rank, t.effective_rank_median,
         f"{t.effective_rank_q1:.3g}-{t.effective_rank_q3:.3g}", t.stable_rank_median,
         t.energy_rank_90_median, t.energy_rank_95_median, t.energy_rank_99_median,
         t.spectral_norm_median, t.frobenius_norm_median, t.top1_energy_median]
        for t in report.type_summaries
    ]
    headers = ["adapter", "module type", "n", "r", "eff. rank (median)", "IQR", "stable rank",
               "E90", "E95", "E99", "spectral norm", "Frobenius", "top-1 energy"]
    return markdown_table(headers, rows, floatfmt=".3g")


def module_table(report: "SpectrumReport") -> str:
    """Every module with its scalar statistics."""
    rows = [
        [m.adapter, m.name, m.rank, m.scale, m.effective_rank, m.stable_rank, m.energy_rank_90,
         m.energy_rank_95, m.energy_rank_99, m.spectral_norm, m.frobenius_norm, m.top1_energy]
        for m in report.modules
    ]
    headers = ["adapter", "module", "r", "scale", "eff. rank", "stable rank", "E90", "E95", "E99",
               "spectral", "Frobenius", "top-1 energy"]
    return markdown_table(headers, rows, floatfmt=".3g")


def render_spectrum_markdown(report: "SpectrumReport") -> str:
    """The ``report.md`` of ``lora spectrum``."""
    parts = ["# LoRA spectra", "", f"{len(report.adapters)} adapter(s), {len(report.modules)} modules, "
             f"analysed in {report.seconds:.2f} s. Effective rank: exp of the entropy of "
             "sigma_i / sum(sigma) (Roy & Vetterli 2007); E90/E95/E99: smallest k keeping that share "
             "of sum(sigma^2).", ""]
    if report.failures:
        parts += ["## Adapters that could not be read", ""]
        parts += [f"- `{f.path}`: {f.error}" for f in report.failures] + [""]
    notes = [(a.name, n) for a in report.adapters for n in a.notes]
    if notes:
        parts += ["## Notes", ""] + [f"- {name}: {n}" for name, n in notes] + [""]
    parts += ["## Adapters", "", adapters_table(report), "", "## Per module type", "", type_table(report), ""]
    if report.comparisons:
        parts += ["## Paired comparisons across layers", ""]
        parts += [f"- {c.adapter}: {c.sentence}" for c in report.comparisons] + [""]
    parts += ["## Plots", "", "![spectra](spectra.png)", "", "![effective rank](effective_rank.png)", "",
              "## Every module", "", module_table(report)]
    return "\n".join(parts)


def plot_spectra(report: "SpectrumReport", path: str | Path) -> Path:
    """sigma_i / sigma_1 per module type: median over layers and inter-quartile band, per adapter."""
    import numpy as np

    types = _types(report.modules)
    cols = min(4, len(types))
    rows = -(-len(types) // cols)
    fig = new_figure(3.2 * cols, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, mtype in zip(axes, types):
        for adapter in report.adapters:
            specs = [m.singular_values for m in report.modules
                     if m.adapter == adapter.name and m.module_type == mtype and m.singular_values
                     and m.singular_values[0] > 0]
            if not specs:
                continue
            width = max(len(s) for s in specs)
            mat = np.full((len(specs), width), np.nan)
            for i, s in enumerate(specs):
                mat[i, : len(s)] = np.asarray(s) / s[0]
            x = np.arange(1, width + 1)
            q1, med, q3 = np.nanpercentile(mat, [25, 50, 75], axis=0)
            line = ax.plot(x, med, lw=1.3, label=adapter.name)[0]
            ax.fill_between(x, q1, q3, color=line.get_color(), alpha=0.25, lw=0)
        ax.set_yscale("log")
        ax.set(title=mtype, xlabel="i", ylabel="σ_i / σ_1")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(types):]:
        ax.set_visible(False)
    if len(report.adapters) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle("normalised LoRA spectra: median over layers, band = inter-quartile range")
    return save_figure(fig, path, dpi=90)


def plot_effective_rank_heatmap(report: "SpectrumReport", path: str | Path) -> Path:
    """Effective rank as a layer x module type heatmap, one panel per adapter."""
    import numpy as np

    types = _types(report.modules)
    names = [a.name for a in report.adapters]
    layers = sorted({m.layer for m in report.modules if m.layer is not None})
    fig = new_figure(1.2 + 0.55 * len(types) * len(names) + 1.0, 1.5 + 0.16 * max(len(layers), 4))
    axes = np.atleast_1d(fig.subplots(1, len(names), squeeze=False)).ravel()
    vmax = max((m.effective_rank for m in report.modules), default=1.0) or 1.0
    image = None
    for ax, name in zip(axes, names):
        grid = np.full((max(len(layers), 1), len(types)), np.nan)
        for m in report.modules:
            if m.adapter == name and m.layer is not None:
                grid[layers.index(m.layer), types.index(m.module_type)] = m.effective_rank
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
        ax.set(title=name, ylabel="layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="effective rank")
    return save_figure(fig, path, dpi=90)


def render_compress_markdown(result: "CompressResult") -> str:
    """The ``report.md`` of ``lora compress``."""
    rows = [[m.name, m.old_rank, m.new_rank, m.kept_energy, m.relative_frobenius_error,
             m.old_parameters, m.new_parameters] for m in result.modules]
    cap = f", max rank {result.max_rank}" if result.max_rank is not None else ""
    parts = [
        "# LoRA re-compression", "",
        f"`{result.adapter}` -> `{result.output}`: kept energy >= {result.energy} per module "
        f"(min rank {result.min_rank}{cap}).", "",
        f"Parameters {result.old_parameters:,} -> {result.new_parameters:,} "
        f"(saving {100 * result.parameter_saving:.1f}%).", "",
    ]
    parts += [f"- note: {n}" for n in result.notes] + ([""] if result.notes else [])
    parts += [markdown_table(["module", "old rank", "new rank", "kept energy", "rel. Frobenius error",
                              "old params", "new params"], rows, floatfmt=".4g")]
    return "\n".join(parts)
