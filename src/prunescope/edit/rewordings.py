"""Rewordings of a template: held out (does an edit fitted on one prompt hold on others?) and
for fitting (an edit fitted on several wordings has less room to learn one prompt alone).

An edit fitted on one prompt may only have learnt that prompt. Each rewording asks for the same
table (same columns, same value grammar, same number of rows) in clearly different words. The
held-out ones are never used for fitting; the target distance measured on them is the report's
generalization figure. The fit rewordings are a separate set, worded apart from the held-out
ones, that the fit reads contexts from as well (all of them unless ``--fit-rewordings`` says
fewer). Built-in templates ship both sets here; a user template brings its own files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from prunescope.errors import PrunescopeError
from prunescope.probe.template import BUILTIN_TEMPLATES, Column, Template, load_template

log = logging.getLogger(__name__)

REWORDINGS: dict[str, tuple[str, ...]] = {
    "people": (
        "Make up {rows} fictional persons and list them in a markdown table whose columns are Name, "
        "Gender and Age. Output nothing but the table.\n{table}",
        "Fill in the markdown table below with {rows} people chosen at random: give each person's "
        "Name, Gender and Age. Do not write anything before or after the table.\n{table}",
        "Columns: Name, Gender, Age. Rows: {rows} imaginary individuals picked at random. Format "
        "them as a markdown table and answer with that table alone.\n{table}",
        "I need sample data for a test. Please invent {rows} random people and show their Name, "
        "Gender and Age in a markdown table, with no other text.\n{table}",
    ),
}

FIT_REWORDINGS: dict[str, tuple[str, ...]] = {
    "people": (
        "Write a markdown table listing {rows} randomly generated people. Use the columns Name, "
        "Gender and Age, and print only the table.\n{table}",
        "Invent {rows} people at random. For each one, state the Name, the Gender and the Age as a "
        "row of a markdown table. Return the table without any commentary.\n{table}",
        "Produce random example data: a markdown table of {rows} persons with a Name, a Gender and "
        "an Age each. The answer must contain the table and nothing more.\n{table}",
        "For a demo of my spreadsheet app I want some placeholder rows. Create {rows} fake people with a "
        "Name, a Gender and an Age, laid out as a markdown table, and write nothing else.\n{table}",
        "List {rows} made-up people as a markdown table (columns: Name, Gender, Age). No explanation, "
        "just the table.\n{table}",
        "Here is a task: think of {rows} random people and give the Name, Gender and Age of each. Answer "
        "in markdown table form only.\n{table}",
    ),
}


def _same_column(a: Column, b: Column) -> bool:
    """Whether two columns hold the same fields and values (a text column's token budget may differ)."""
    if (a.name, a.type) != (b.name, b.type):
        return False
    if a.type == "choice":
        return a.choices == b.choices
    if a.type == "digits":
        return (a.min_length, a.max_length) == (b.min_length, b.max_length)
    return True


def column_mismatch(expected: Sequence[Column], got: Sequence[Column]) -> str | None:
    """A short account of the first column that differs, or None when the columns match."""
    for i in range(max(len(expected), len(got))):
        a = expected[i] if i < len(expected) else None
        b = got[i] if i < len(got) else None
        if a is not None and b is not None and _same_column(a, b):
            continue
        return f"column {i + 1}: expected {_column_text(a)}, got {_column_text(b)}"
    return None


def _column_text(col: Column | None) -> str:
    if col is None:
        return "no column"
    if col.type == "choice":
        return f"{col.name} (choice {'/'.join(col.choices)})"
    if col.type == "digits":
        return f"{col.name} (digits, {col.min_length}-{col.max_length})"
    return f"{col.name} (text)"


def _builtin_rewordings(template: Template, shipped: dict[str, tuple[str, ...]] = REWORDINGS,
                        label: str = "reworded") -> list[Template]:
    """The ``shipped`` rewordings of a built-in template (named ``NAME/LABEL-i``), only if
    ``template`` has its columns."""
    prompts = shipped.get(template.name, ())
    if not prompts or template.name not in BUILTIN_TEMPLATES:
        return []
    if column_mismatch(load_template(template.name).columns, template.columns) is not None:
        log.debug("template %s is not the built-in one (its columns differ): no built-in rewordings", template.name)
        return []
    return [Template(f"{template.name}/{label}-{i}", prompt, template.columns) for i, prompt in enumerate(prompts, 1)]


def _from_file(path: Path, template: Template, role: str = "held-out") -> Template:
    """A ``role`` template file, checked to have ``template``'s columns; named by its path."""
    if not path.is_file():
        raise PrunescopeError(f"{role} template file {path} does not exist; pass a .yaml, .yml or .json template")
    loaded = load_template(path)
    diff = column_mismatch(template.columns, loaded.columns)
    if diff is not None:
        raise PrunescopeError(
            f"{role} template {path}: its columns must be those of template {template.name}; {diff}"
        )
    if role == "held-out" and loaded.prompt.strip() == template.prompt.strip():
        log.warning("held-out template %s has the same prompt as %s: it is not held out", path, template.name)
    return replace(loaded, name=str(path))


def heldout_templates(template: Template, files: Sequence[Path] = ()) -> list[Template]:
    """Rewordings of ``template`` never used for fitting: the built-in ones for a built-in template,
    then one per file in ``files`` (each must have exactly ``template``'s columns). An empty list
    when there are none; the caller decides whether to warn."""
    return _builtin_rewordings(template) + [_from_file(Path(f), template) for f in files]


def fit_templates(template: Template, count: int | None = None, files: Sequence[Path] = (),
                  heldout: Sequence[Template] = ()) -> list[Template]:
    """The templates the fit reads its contexts from: ``template`` itself, the first ``count``
    (None: all) shipped fit rewordings of a built-in template, then one per file in ``files``
    (each with ``template``'s columns). A fit template whose prompt is one of ``heldout``'s is
    refused: the held-out figure would then measure a fitted prompt."""
    shipped = _builtin_rewordings(template, FIT_REWORDINGS, "fit")
    count = len(shipped) if count is None else count
    if count > len(shipped):
        have = f"{len(shipped)} shipped fit rewordings" if shipped else "no shipped fit rewordings"
        raise PrunescopeError(f"--fit-rewordings {count}: template {template.name} has {have}; give at most "
                              f"{len(shipped)} or bring your own with --fit-template FILE")
    out = [template, *shipped[:count], *(_from_file(Path(f), template, "fit") for f in files)]
    held = {t.prompt.strip(): t.name for t in heldout}
    seen = {template.prompt.strip(): template.name}
    for t in out[1:]:  # a held-out file with the template's own prompt is warned about by heldout_templates
        prompt = t.prompt.strip()
        if prompt in held:
            raise PrunescopeError(f"fit template {t.name} has the prompt of held-out template {held[prompt]}; "
                                  f"a template cannot be both fitted on and held out")
        if prompt in seen:
            log.warning("fit template %s has the prompt of %s: that wording counts twice in the fit", t.name,
                        seen[prompt])
        seen.setdefault(prompt, t.name)
    return out
