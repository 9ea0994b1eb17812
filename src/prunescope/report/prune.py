"""Render a :class:`~prunescope.pipeline.PruneResult` as Markdown and a per-layer sparsity plot."""

from __future__ import annotations

from pathlib import Path

from prunescope.pipeline import PruneResult
from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure


def _ppl(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.3f}"


def layer_table(result: PruneResult) -> str:
    """Markdown table of per-layer shape and sparsity."""
    rows = [(ls.name, "x".join(map(str, ls.shape)), f"{100 * ls.sparsity:.1f}%") for ls in result.layers]
    return markdown_table(["layer", "shape", "sparsity"], rows)


def render_markdown(result: PruneResult) -> str:
    """The human-readable report, rendered from the result alone."""
    summary = markdown_table(
        ["", "value"],
        [
            ("model", result.model),
            ("method", f"{result.method} ({result.scope}, {result.pattern})"),
            ("sparsity requested", f"{100 * result.sparsity_requested:.1f}%"),
            ("sparsity actual (pruned layers)", f"{100 * result.sparsity_actual:.2f}%"),
            ("zeroed weights", f"{result.pruned_parameters:,} of {result.total_parameters:,} parameters"),
            ("dense perplexity", _ppl(result.dense_ppl)),
            ("pruned perplexity", _ppl(result.pruned_ppl)),
            ("evaluation", f"{result.eval_tokens:,} tokens of {result.eval_text!r} in {result.eval_seqlen}-token windows"),
            ("prune time", f"{result.prune_seconds:.2f} s"),
        ],
    )
    return (
        f"# prunescope prune: {result.model}\n\n{summary}\n\n"
        f"![per-layer sparsity](sparsity.png)\n\n## Per-layer sparsity\n\n{layer_table(result)}\n"
    )


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
