"""Render a :class:`~prunescope.zeroshot.ZeroShotResult` as Markdown."""

from __future__ import annotations

from prunescope.report.io import markdown_table
from prunescope.zeroshot import ZeroShotResult


def scores_table(result: ZeroShotResult) -> str:
    """One row per task: acc and acc_norm with their standard errors (n/a where not reported)."""
    nan = float("nan")
    rows = [
        (task, s["acc"], s.get("acc_stderr", nan), s.get("acc_norm", nan), s.get("acc_norm_stderr", nan))
        for task, s in result.scores.items()
    ]
    return markdown_table(["task", "acc", "± stderr", "acc_norm", "± stderr"], rows, floatfmt=".4f")


def render_markdown(result: ZeroShotResult) -> str:
    """The report: what was measured, then the table."""
    items = "all items" if result.limit is None else f"the first {result.limit} items of each task"
    return "\n\n".join([
        f"# Zero-shot accuracy: {result.model}",
        f"lm-evaluation-harness {result.lm_eval_version}, 0-shot, {items}; "
        f"{result.seconds:.1f} s. acc_norm picks the choice with the highest log-likelihood per character.",
        scores_table(result),
    ])
