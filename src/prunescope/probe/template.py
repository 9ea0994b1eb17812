"""Table templates: the prompt, the columns and each column's value grammar, validated once.

A template is YAML or JSON with ``prompt`` (containing ``{table}``, the place where the table is
written, and optionally ``{rows}``, the number of rows asked for) and ``columns``: a list of
``{name, type, ...}`` where ``type`` is

- ``digits``: ``min_length``/``max_length`` digits (e.g. an age);
- ``choice``: one of ``choices`` (a non-empty list of distinct strings);
- ``text``: free text up to the cell delimiter ``|`` (``max_tokens`` tokens at most).

The table is always a markdown table: header ``| A | B |``, rule ``|---|---|``, rows ``| a | b |``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prunescope.errors import PrunescopeError

COLUMN_TYPES = ("digits", "choice", "text")
BUILTIN_TEMPLATES = ("people",)


@dataclass(frozen=True)
class Column:
    """One column and its value grammar."""

    name: str
    type: str
    choices: tuple[str, ...] = ()
    min_length: int = 1
    max_length: int = 3
    max_tokens: int = 8

    def accepts(self, value: str) -> bool:
        """Whether a written cell value (stripped) belongs to the grammar."""
        if self.type == "digits":
            return re.fullmatch(rf"[0-9]{{{self.min_length},{self.max_length}}}", value) is not None
        if self.type == "choice":
            return value in self.choices
        return bool(value) and "\n" not in value


@dataclass(frozen=True)
class Template:
    """A validated table template."""

    name: str
    prompt: str
    columns: tuple[Column, ...]

    def instruction(self, rows: int) -> str:
        """The prompt text before the table, with ``{rows}`` filled in."""
        return self.prompt.split("{table}")[0].replace("{rows}", str(rows)).rstrip()

    def header(self) -> str:
        """The forced markdown header and rule, ending with a newline."""
        names = " | ".join(c.name for c in self.columns)
        return f"| {names} |\n|" + "---|" * len(self.columns) + "\n"


def _int(spec: dict[str, Any], key: str, default: int, where: str) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PrunescopeError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _column(spec: Any, index: int, source: str) -> Column:
    where = f"template {source}, column {index + 1}"
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise PrunescopeError(f"{where}: expected a mapping with a non-empty 'name', got {spec!r}")
    kind = spec.get("type")
    if kind not in COLUMN_TYPES:
        raise PrunescopeError(
            f"{where} ({spec['name']}): unknown column type {kind!r}; valid types: {', '.join(COLUMN_TYPES)}"
        )
    if kind == "choice":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PrunescopeError(f"{where} ({spec['name']}): a choice column needs a non-empty 'choices' list")
        if any(not isinstance(c, str) or not c.strip() or "|" in c or "\n" in c for c in choices):
            raise PrunescopeError(f"{where} ({spec['name']}): choices must be non-empty strings without '|' or newlines")
        if len(set(choices)) != len(choices):
            raise PrunescopeError(f"{where} ({spec['name']}): choices must be distinct, got {choices}")
        return Column(spec["name"].strip(), kind, choices=tuple(c.strip() for c in choices))
    if kind == "digits":
        lo, hi = _int(spec, "min_length", 1, where), _int(spec, "max_length", 3, where)
        if lo > hi:
            raise PrunescopeError(f"{where}: min_length {lo} is larger than max_length {hi}")
        return Column(spec["name"].strip(), kind, min_length=lo, max_length=hi)
    return Column(spec["name"].strip(), kind, max_tokens=_int(spec, "max_tokens", 8, where))


def parse_template(data: Any, source: str = "<dict>") -> Template:
    """Validate a template mapping (as read from YAML/JSON) into a :class:`Template`."""
    if not isinstance(data, dict):
        raise PrunescopeError(f"template {source}: expected a mapping with 'prompt' and 'columns'")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or prompt.count("{table}") != 1:
        raise PrunescopeError(
            f"template {source}: the prompt must contain the place for the table, '{{table}}', exactly once"
        )
    if prompt.split("{table}")[1].strip():
        raise PrunescopeError(f"template {source}: nothing may follow '{{table}}' in the prompt (the model writes the table last)")
    columns = data.get("columns")
    if not isinstance(columns, list) or not columns:
        raise PrunescopeError(f"template {source}: 'columns' must be a non-empty list")
    cols = tuple(_column(spec, i, source) for i, spec in enumerate(columns))
    return Template(str(data.get("name", source)), prompt, cols)


def load_template(name_or_path: str | Path) -> Template:
    """A built-in template by name (``people``) or a user template file (``.yaml``, ``.yml``, ``.json``)."""
    import yaml

    name = str(name_or_path)
    if name in BUILTIN_TEMPLATES:
        text = resources.files("prunescope.probe").joinpath(f"templates/{name}.yaml").read_text("utf-8")
        return parse_template(yaml.safe_load(text), name)
    path = Path(name)
    if not path.is_file():
        raise PrunescopeError(
            f"template {name!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    try:
        text = path.read_text("utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PrunescopeError(f"template file {path} is not valid YAML/JSON: {exc}") from exc
    return parse_template(data, str(path))
