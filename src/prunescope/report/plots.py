"""Matplotlib helpers shared by the report renderers (headless Agg backend, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prunescope import atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float = 8.0, height: float = 4.5) -> "Figure":
    """A fresh Figure that is not registered with pyplot (so nothing leaks between calls)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: "Figure", path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG to ``path`` (parents created), atomically (a half-drawn plot never
    replaces a finished one), and return the path."""
    path = Path(path)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
