"""Targets of an edit: the distribution a field of the probe table should have after editing.

A target names one *field* of a template -- a choice column (``Gender``) or one digit position
of a digits column (``Age.digit1``, 1-based) -- and gives a probability for every value the
field can take, optionally only for some rows of the table. The same grammar serves the CLI's
``--target`` and the keys of a target file, so a user learns it once::

    FIELD[@ROWS]=DIST
    FIELD  Gender | Age.digit1 ... Age.digitK        (K = the column's max_length)
    ROWS   1 | 1-3 | 1,4 | 1-3,5                     (1-based; absent = every fitted row)
    DIST   uniform                                   all values equally likely
           uniform:2-6                               digits only: an inclusive digit range
           uniform:Male,Female                       equal mass on the listed values
           Male:0.7,Female:0.3                       explicit; values not listed get 0

Column names and values match exactly, or case-insensitively when that match is unique.
Values containing ``,`` cannot be written in the one-line form; a target file's
``value -> probability`` mapping can hold any value.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunescope.errors import PrunescopeError
from prunescope.probe.run import DIGITS
from prunescope.probe.template import Template

log = logging.getLogger(__name__)

TARGET_FILE_SUFFIXES = (".json", ".yaml", ".yml")
SUM_TOLERANCE = 1e-6
EXAMPLES = "e.g. Age.digit1=uniform:2-6, Gender=uniform or Gender=Male:0.5,Female:0.5"


@dataclass(frozen=True)
class FieldKey:
    """One field of a table: a choice column, or one digit position of a digits column."""

    column: str
    position: int | None  # 1-based digit position for a digits column; None for a choice column

    @property
    def label(self) -> str:
        """The field's name in reports, the same as ``FieldDistribution.label``."""
        return self.column if self.position is None else f"{self.column} digit {self.position}"

    @property
    def spelling(self) -> str:
        """How the field is written in a target: ``Gender`` or ``Age.digit1``."""
        return self.column if self.position is None else f"{self.column}.digit{self.position}"


@dataclass(frozen=True)
class Target:
    """The wanted distribution of one field, over all its values, on some rows (or every row)."""

    key: FieldKey
    values: tuple[str, ...]  # all allowed values of the field: the column's choices, or DIGITS
    probs: tuple[float, ...]  # target probability of each value, aligned with values, sums to 1
    rows: tuple[int, ...] | None = None  # 1-based rows this target applies to; None = every fitted row

    def __post_init__(self) -> None:
        if len(self.values) != len(self.probs) or not self.values:
            raise PrunescopeError(
                f"target {self.key.label}: {len(self.probs)} probabilities for {len(self.values)} values"
            )
        if any(not math.isfinite(p) or p < 0 for p in self.probs) or abs(sum(self.probs) - 1) > SUM_TOLERANCE:
            raise PrunescopeError(
                f"target {self.key.label}: probabilities must be finite, >= 0 and sum to 1, got {self.probs}"
            )
        if self.rows is not None and (not self.rows or any(r < 1 for r in self.rows)):
            raise PrunescopeError(f"target {self.key.label}: rows must be 1-based row numbers, got {self.rows}")

    def as_array(self) -> np.ndarray:
        """The probabilities as a float64 vector aligned with :attr:`values` (a fresh copy)."""
        return np.array(self.probs, dtype=np.float64)

    def applies_to(self, row: int) -> bool:
        """Whether this target constrains 1-based ``row`` (always, when no rows were given)."""
        return self.rows is None or row in self.rows

    def describe(self) -> str:
        """Short human text, e.g. ``Age digit 1: uniform over 2-6`` or ``Gender (row 1): Male 0.7, Female 0.3``."""
        where = "" if self.rows is None else f" ({'row' if len(self.rows) == 1 else 'rows'} {rows_text(self.rows)})"
        return f"{self.key.label}{where}: {self._shape()}"

    def _shape(self) -> str:
        support = [(v, p) for v, p in zip(self.values, self.probs) if p > 0]
        if max(p for _, p in support) - min(p for _, p in support) > 1e-9:
            return ", ".join(f"{v} {p:.3g}" for v, p in support)
        if len(support) == len(self.values):
            return "uniform"
        if len(support) == 1:
            return f"all mass on {support[0][0]}"
        names = [v for v, _ in support]
        if self.key.position is not None and _contiguous(names):
            return f"uniform over {names[0]}-{names[-1]}"
        return "uniform over " + ", ".join(names)


def _contiguous(digits: list[str]) -> bool:
    idx = [DIGITS.index(d) for d in digits]
    return idx == list(range(idx[0], idx[0] + len(idx)))


def rows_text(rows: Sequence[int]) -> str:
    """Sorted row numbers written compactly: ``(1, 2, 3, 5)`` -> ``1-3, 5``."""
    parts: list[str] = []
    start = prev = None
    for r in sorted(rows):
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = r
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Fields and values


def target_fields(template: Template) -> dict[str, FieldKey]:
    """Every field of ``template`` that can be a target, by its spelling (``Gender``, ``Age.digit1``)."""
    out: dict[str, FieldKey] = {}
    for col in template.columns:
        if col.type == "choice":
            out[col.name] = FieldKey(col.name, None)
        elif col.type == "digits":
            for pos in range(1, col.max_length + 1):
                out[f"{col.name}.digit{pos}"] = FieldKey(col.name, pos)
    return out


def field_values(key: FieldKey, template: Template) -> tuple[str, ...]:
    """All values ``key``'s field can take: the column's choices, or the ten digits."""
    if key.position is not None:
        return DIGITS
    return next(c.choices for c in template.columns if c.name == key.column)


def _unique_match(text: str, names: Sequence[str]) -> str | None:
    """``text`` itself if it is among ``names``, else the one name equal to it ignoring case."""
    if text in names:
        return text
    folded = [n for n in names if n.casefold() == text.casefold()]
    return folded[0] if len(folded) == 1 else None


def resolve_field(text: str, template: Template) -> FieldKey:
    """The field a target names; an error lists the valid spellings."""
    fields = target_fields(template)
    name = text.strip()
    found = _unique_match(name, list(fields))
    if found is not None:
        return fields[found]
    valid = ", ".join(fields)
    if not fields:
        raise PrunescopeError(f"template {template.name} has no choice or digits column that could be a target")
    col = next((c for c in template.columns if _unique_match(name, [c.name]) is not None), None)
    if col is not None and col.type == "digits":
        raise PrunescopeError(
            f"{col.name} is a digits column: name one digit position, "
            f"{col.name}.digit1 ... {col.name}.digit{col.max_length}"
        )
    if col is not None and col.type == "text":
        raise PrunescopeError(f"{col.name} is a text column and cannot be a target; valid fields: {valid}")
    raise PrunescopeError(f"unknown field {name!r}; valid fields: {valid}")


def _match_value(text: str, key: FieldKey, values: Sequence[str]) -> str:
    found = _unique_match(text.strip(), values)
    if found is None:
        raise PrunescopeError(f"{text.strip()!r} is not a value of {key.label}; valid values: {', '.join(values)}")
    return found


# ---------------------------------------------------------------------------------------------
# Rows and distributions


def parse_rows(text: str) -> tuple[int, ...]:
    """``1`` / ``1-3`` / ``1,4`` / ``1-3,5`` -> sorted, distinct 1-based row numbers."""
    rows: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        lo = int(m.group(1)) if m else 0
        hi = int(m.group(2) or lo) if m else 0
        if m is None or lo < 1 or hi < lo:
            raise PrunescopeError(f"rows {text.strip()!r}: expected 1-based row numbers such as 1, 1-3 or 1,4")
        rows.update(range(lo, hi + 1))
    return tuple(sorted(rows))


def _uniform(support: Sequence[str], key: FieldKey, values: Sequence[str]) -> tuple[float, ...]:
    if not support:
        raise PrunescopeError(f"{key.label}: the target puts all mass on nothing; list at least one value")
    return tuple(1 / len(support) if v in support else 0.0 for v in values)


def _support(items: str, key: FieldKey, values: Sequence[str]) -> list[str]:
    """The values named by ``uniform:ITEMS``: a comma list of values and, for digits, ranges ``A-B``."""
    picked: list[str] = []
    for item in (i.strip() for i in items.split(",")):
        if not item:
            continue
        span = re.fullmatch(r"(\d)\s*-\s*(\d)", item) if key.position is not None else None
        if span and int(span.group(1)) > int(span.group(2)):
            raise PrunescopeError(f"{key.label}: digit range {item!r} runs backwards; write it low-high, e.g. 2-6")
        new = list(DIGITS[int(span.group(1)): int(span.group(2)) + 1]) if span else [_match_value(item, key, values)]
        if any(v in picked for v in new):
            raise PrunescopeError(f"{key.label}: value {item!r} is listed twice in uniform:{items.strip()}")
        picked.extend(new)
    return picked


def _probability(raw: object, key: FieldKey, value: str) -> float:
    try:
        p = float(raw) if isinstance(raw, (int, float, str)) and not isinstance(raw, bool) else math.nan
    except ValueError:
        p = math.nan
    if not math.isfinite(p) or p < 0:
        raise PrunescopeError(f"{key.label}: probability of {value} must be a finite number >= 0, got {raw!r}")
    return p


def _explicit(pairs: Sequence[tuple[str, object]], key: FieldKey, values: Sequence[str]) -> tuple[float, ...]:
    """Probabilities from ``(value, probability)`` pairs; unlisted values get 0; renormalised exactly."""
    given: dict[str, float] = {}
    for text, raw in pairs:
        value = _match_value(str(text), key, values)
        if value in given:
            raise PrunescopeError(f"{key.label}: value {value} is given twice")
        given[value] = _probability(raw, key, value)
    total = math.fsum(given.values())
    if not given or total == 0:
        raise PrunescopeError(f"{key.label}: the target puts all mass on nothing; give some value a probability > 0")
    if abs(total - 1) > SUM_TOLERANCE:
        raise PrunescopeError(f"{key.label}: probabilities sum to {total:.6g}, not 1 (within {SUM_TOLERANCE:g})")
    return tuple(given.get(v, 0.0) / total for v in values)


def parse_dist(text: str, key: FieldKey, values: Sequence[str]) -> tuple[float, ...]:
    """A DIST string (``uniform``, ``uniform:2-6``, ``uniform:A,B``, ``A:0.7,B:0.3``) -> probabilities."""
    dist = text.strip()
    head, colon, rest = dist.partition(":")
    if dist.casefold() == "uniform":
        return _uniform(values, key, values)
    if colon and head.strip().casefold() == "uniform":
        return _uniform(_support(rest, key, values), key, values)
    pairs = [part.rpartition(":") for part in dist.split(",") if part.strip()]
    if not pairs or any(not sep for _, sep, _ in pairs):
        raise PrunescopeError(
            f"{key.label}: cannot read {dist!r}; expected uniform, uniform:A-B (digits), "
            "uniform:V1,V2 or V1:P1,V2:P2"
        )
    return _explicit([(v, p.strip()) for v, _, p in pairs], key, values)


def _split_field(lhs: str, template: Template) -> tuple[str, tuple[int, ...] | None]:
    """``FIELD`` or ``FIELD@ROWS`` -> (field text, rows or None); a field whose name holds '@' still works."""
    if "@" not in lhs or lhs.strip() in target_fields(template):
        return lhs, None
    field, _, rows = lhs.rpartition("@")
    return field, parse_rows(rows)


def _build(lhs: str, dist: str | Mapping[object, object], template: Template) -> Target:
    field, rows = _split_field(lhs, template)
    key = resolve_field(field, template)
    values = field_values(key, template)
    if isinstance(dist, str):
        probs = parse_dist(dist, key, values)
    elif isinstance(dist, Mapping):
        probs = _explicit([(str(v), p) for v, p in dist.items()], key, values)
    else:
        raise PrunescopeError(
            f"{key.label}: expected a DIST string or a mapping value -> probability, got {type(dist).__name__}"
        )
    return Target(key, values, probs, rows)


# ---------------------------------------------------------------------------------------------
# Entry points: one spec, one file, the CLI's list


def parse_target(spec: str, template: Template) -> Target:
    """One ``FIELD[@ROWS]=DIST`` spec (the CLI's ``--target``) against ``template``'s columns."""
    lhs, eq, dist = spec.partition("=")
    if not eq or not lhs.strip():
        raise PrunescopeError(f"target {spec!r}: expected FIELD=DIST, {EXAMPLES}")
    try:
        return _build(lhs, dist, template)
    except PrunescopeError as exc:
        raise PrunescopeError(f"target {spec!r}: {exc}") from exc


def _read_mapping(path: Path) -> Mapping[object, object]:
    """A target file's top-level mapping. YAML is read with every scalar kept as written (so ``0``
    stays the digit "0" and ``No`` stays a choice, not False); probabilities are parsed here."""
    import yaml

    try:
        text = path.read_text("utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=yaml.BaseLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunescopeError(f"target file {path}: cannot read it: {exc}") from exc
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise PrunescopeError(f"target file {path} is not valid {kind}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, Mapping) or not data:
        raise PrunescopeError(
            f"target file {path}: expected a non-empty mapping FIELD[@ROWS] -> DIST or value -> probability, "
            f"{EXAMPLES}"
        )
    return data


def _load_sourced(path: Path, template: Template) -> list[tuple[Target, str]]:
    out: list[tuple[Target, str]] = []
    for key, dist in _read_mapping(path).items():
        where = f"target file {path}, key {key!r}"
        try:
            out.append((_build(str(key), dist, template), where))  # type: ignore[arg-type]
        except PrunescopeError as exc:
            raise PrunescopeError(f"{where}: {exc}") from exc
    return out


def load_targets(path: str | Path, template: Template) -> list[Target]:
    """The targets in a JSON/YAML file: keys ``FIELD[@ROWS]``, values a DIST string or value -> probability."""
    sourced = _load_sourced(Path(path), template)
    _check_overlaps(sourced)
    return [t for t, _ in sourced]


def _is_file_spec(spec: str) -> bool:
    path = Path(spec.strip())
    return path.suffix.lower() in TARGET_FILE_SUFFIXES and ("=" not in spec or path.is_file())


def parse_targets(specs: Sequence[str], template: Template) -> list[Target]:
    """The CLI's ``--target`` list: each a ``FIELD[@ROWS]=DIST`` spec or a target file; at least one;
    no field may be targeted twice on the same row (a target without rows covers every row)."""
    if not specs:
        raise PrunescopeError(f"no target given: pass --target FIELD=DIST or a .json/.yaml file, {EXAMPLES}")
    sourced: list[tuple[Target, str]] = []
    for spec in specs:
        if _is_file_spec(spec):
            sourced.extend(_load_sourced(Path(spec.strip()), template))
        elif "=" not in spec:
            raise PrunescopeError(
                f"target {spec!r}: expected FIELD=DIST or a path to a .json, .yaml or .yml file, {EXAMPLES}"
            )
        else:
            sourced.append((parse_target(spec, template), f"target {spec!r}"))
    _check_overlaps(sourced)
    log.debug("targets: %s", "; ".join(t.describe() for t, _ in sourced))
    return [t for t, _ in sourced]


def _check_overlaps(sourced: Sequence[tuple[Target, str]]) -> None:
    """Reject two targets on the same field and row: which one should win would be a guess."""
    for i, (a, where_a) in enumerate(sourced):
        for b, where_b in sourced[i + 1:]:
            if a.key != b.key:
                continue
            if a.rows is None or b.rows is None:
                rows = "on every row"
            else:
                common = sorted(set(a.rows) & set(b.rows))
                if not common:
                    continue
                rows = f"on {'row' if len(common) == 1 else 'rows'} {rows_text(common)}"
            raise PrunescopeError(
                f"{a.key.spelling} is targeted twice {rows} ({where_a}; {where_b}); give each field and row one target"
            )
