"""Render a :class:`~prunescope.pruning.job.PruneResult` as Markdown, a per-layer sparsity plot and,
for ``--sweep``, a plot of perplexity against sparsity."""

from __future__ import annotations

from pathlib import Path

from prunescope.pruning.job import PruneResult
from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure


def _ppl(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.3f}"


def layer_table(result: PruneResult) -> str:
    """Markdown table of per-layer shape and sparsity."""
    rows = [(ls.name, "x".join(map(str, ls.shape)), f"{100 * ls.sparsity:.1f}%") for ls in result.layers]
    return markdown_table(["layer", "shape", "sparsity"], rows)


def allocation_table(result: PruneResult) -> str:
    """Markdown table of OWL's allocation: each decoder layer's outlier ratio and sparsity."""
    rows = [(str(t.index), f"{100 * t.outlier_ratio:.3f}%", f"{100 * t.sparsity:.1f}%") for t in result.layer_targets]
    return markdown_table(["decoder layer", "outlier ratio", "target sparsity"], rows)


def sweep_table(result: PruneResult) -> str:
    """Markdown table of the sweep: method, sparsity, perplexity, prune time."""
    rows = [
        (p.method, f"{100 * p.sparsity:.0f}%", f"{100 * p.sparsity_actual:.2f}%", _ppl(p.ppl), f"{p.prune_seconds:.1f} s")
        for p in result.sweep
    ]
    return markdown_table(["method", "sparsity", "actual", "perplexity", "prune time"], rows)


def accuracy_table(result: PruneResult) -> str:
    """Markdown table of zero-shot accuracy (lm-eval) per task, dense and pruned, with standard errors."""
    def cell(scores, task: str, metric: str) -> str:
        s = scores.get(task, {})
        return "n/a" if metric not in s else f"{s[metric]:.4f} ± {s.get(metric + '_stderr', float('nan')):.4f}"

    rows = [
        (task, cell(result.dense_accuracy, task, "acc"), cell(result.pruned_accuracy, task, "acc"),
         cell(result.dense_accuracy, task, "acc_norm"), cell(result.pruned_accuracy, task, "acc_norm"))
        for task in result.dense_accuracy
    ]
    return markdown_table(["task", "dense acc", "pruned acc", "dense acc_norm", "pruned acc_norm"], rows)


def _summary_rows(result: PruneResult) -> list[tuple[str, str]]:
    rows = [
        ("model", result.model),
        ("method", f"{result.method} ({result.scope}, {result.pattern})"
         + (f", masks refined by {result.refine}" if result.refine != "none" else "")
         + (", MLP units permuted for N:M (RIA)" if result.permute else "")),
        ("sparsity requested", f"{100 * result.sparsity_requested:.1f}%"
         + (" (mean over decoder layers, allocated by OWL)" if result.layer_targets else "")),
        ("sparsity actual (pruned layers)", f"{100 * result.sparsity_actual:.2f}%"),
        ("zeroed weights", f"{result.pruned_parameters:,} of {result.total_parameters:,} parameters"),
        ("dense perplexity", _ppl(result.dense_ppl)),
        ("pruned perplexity", _ppl(result.pruned_ppl)),
        ("evaluation", f"{result.eval_tokens:,} tokens of {result.eval_text!r} in {result.eval_seqlen}-token windows"),
        ("prune time", f"{result.prune_seconds:.2f} s"),
    ]
    if result.calib_samples:
        rows.append((
            "calibration",
            f"{result.calib_samples} x {result.calib_seqlen} tokens of {result.calib_text!r} (seed {result.seed}), "
            f"{result.calib_activation_bytes / 2**20:.1f} MB of activations held",
        ))
    if result.skipped_layers:
        rows.append(("skipped (incompatible with N:M)", ", ".join(result.skipped_layers)))
    if result.offloaded:
        rows.append(("offloaded", "yes: weights on disk, one decoder layer in memory at a time"))
    if result.peak_rss_bytes:
        rows.append(("peak resident memory of the process", f"{result.peak_rss_bytes / 2**20:,.0f} MiB"))
    if result.checkpoint:
        rows += [(f"checkpoint {k}", str(v)) for k, v in result.checkpoint.items()]
    return rows


def render_markdown(result: PruneResult) -> str:
    """The human-readable report, rendered from the result alone."""
    summary = markdown_table(["", "value"], _summary_rows(result))
    text = f"# prunescope prune: {result.model}\n\n{summary}\n\n"
    if result.layer_targets:
        text += (
            "## Allocation (OWL)\n\nEach decoder layer's share of Wanda scores above M x its mean, on the "
            f"dense model, and the sparsity it was pruned to:\n\n{allocation_table(result)}\n\n"
        )
    if result.dense_accuracy:
        text += (
            "## Zero-shot accuracy (lm-eval)\n\nEach choice scored by its log-likelihood given the question "
            f"(acc_norm: per character), 0-shot, with standard errors:\n\n{accuracy_table(result)}\n\n"
        )
    if result.sweep:
        text += f"## Sweep\n\n![perplexity against sparsity](sweep.png)\n\n{sweep_table(result)}\n\n"
    return text + f"![per-layer sparsity](sparsity.png)\n\n## Per-layer sparsity\n\n{layer_table(result)}\n"


def plot_layer_sparsity(result: PruneResult, path: str | Path) -> Path:
    """Bar chart of the sparsity of each pruned layer, in model order."""
    n = len(result.layers)
    fig = new_figure(width=max(8.0, 0.06 * n + 4), height=4.5)
    ax = fig.add_subplot()
    ax.bar(range(n), [100 * ls.sparsity for ls in result.layers], width=0.9, color="tab:blue")
    ax.axhline(100 * result.sparsity_requested, color="tab:red", linestyle="--", label="requested")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("zeros (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.model}: {result.method} {result.scope} pruning, per-layer sparsity")
    step = max(1, n // 30)
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels([result.layers[i].name for i in range(0, n, step)], rotation=90, fontsize=6)
    ax.legend()
    return save_figure(fig, path)


def plot_sweep(result: PruneResult, path: str | Path) -> Path:
    """Perplexity (log scale) against sparsity, one line per method, dense as a dashed line."""
    fig = new_figure(width=7.0, height=4.5)
    ax = fig.add_subplot()
    for method in dict.fromkeys(p.method for p in result.sweep):
        pts = [p for p in result.sweep if p.method == method and p.ppl is not None]
        ax.plot([100 * p.sparsity for p in pts], [p.ppl for p in pts], marker="o", label=method)
    if result.dense_ppl is not None:
        ax.axhline(result.dense_ppl, color="gray", linestyle="--", label=f"dense ({result.dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of pruned layers (%)")
    ax.set_ylabel(f"perplexity ({result.eval_tokens:,} tokens)")
    ax.set_title(f"{result.model}: perplexity against sparsity")
    ax.legend()
    return save_figure(fig, path)
