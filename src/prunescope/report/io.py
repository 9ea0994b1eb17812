"""Serialise frozen result dataclasses to JSON and render simple Markdown.

JSON is the canonical output of every command; Markdown and plots are rendered from the same
result object, never from separate state.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from prunescope import atomic


def to_jsonable(obj: Any) -> Any:
    """Convert a result (dataclasses, tensors, numpy, paths, enums) into plain JSON types.

    Non-finite floats become ``None`` so the output is strict JSON.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, Sequence) or isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _atomic_write(path: Path, data: str) -> None:
    """Write text to ``path`` via a flushed temporary sibling and a rename, so readers never see
    half a file (:func:`prunescope.atomic.replacing`)."""
    with atomic.replacing(path) as tmp:
        tmp.write_text(data, encoding="utf-8")


def write_json(result: Any, path: str | Path) -> Path:
    """Write ``result`` as indented, strict JSON to ``path`` and return the path."""
    path = Path(path)
    _atomic_write(path, json.dumps(to_jsonable(result), indent=2, allow_nan=False) + "\n")
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Write a text report (Markdown) atomically and return the path."""
    path = Path(path)
    _atomic_write(path, text if text.endswith("\n") else text + "\n")
    return path


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, float):
        return format(value, floatfmt) if math.isfinite(value) else "n/a"
    return str(value).replace("|", "\\|")


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4g"
) -> str:
    """Render a GitHub-flavoured Markdown table; floats use ``floatfmt``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v, floatfmt) for v in row) + " |" for row in rows]
    return "\n".join(lines)
