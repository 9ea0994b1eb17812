"""The probe job: write N tables, turn the observations into distributions and statistics.

Estimands. For a field at row ``r`` the model's *marginal* probability of each allowed value is
``E_prefix[p(value | prefix)]``, averaged over the N sampled tables (prefixes). Exact mode reads
``p(value | prefix)`` from the logits for every prefix and averages (a band of +-1.96 standard
errors across prefixes); sampling mode counts how often the value was written (Wilson interval).
Both estimate the same number. The *distribution* reported (and used for the statistics) is the
marginal renormalised over the allowed values; the mass outside them is reported alongside.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunescope import models
from prunescope.errors import PrunescopeError
from prunescope.probe import stats
from prunescope.probe.sampling import DRAWS
from prunescope.probe.tables import CellObservations, write_tables
from prunescope.probe.template import Column, Template, load_template

log = logging.getLogger(__name__)

MODES = ("exact", "sample")
CONTENT_FREE = "N/A"
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class ProbeConfig(models.Placement):
    """Options of a probe run, validated on construction.

    Attributes:
        model: 'smollm2-135m', a local HF folder or an HF id.
        template: a built-in template name (``people``) or a YAML/JSON file.
        rows: rows per table (>= 1).
        samples: tables written (>= 1).
        seed: seed of the sampler.
        mode: ``exact`` (read distributions from the logits) or ``sample`` (count only).
        draws: ``rqmc`` or ``iid`` (see :mod:`.sampling`); None: ``rqmc`` in exact mode, ``iid``
            in sampling mode.
        exact_columns: in exact mode, the columns whose distributions are read from the logits
            (None: all); the others are counted only. Checked against the template when run.
        temperature: sampling temperature of the cells (1 = the model's own distribution).
        batch_size: tables written at once with one KV cache.
        reference: optional JSON/YAML file ``{column: {value: probability}}`` (default uniform).
        target: ``uniform`` to report importance resampling towards the reference, or None.
        calibrate: report contextual calibration (content-free instruction ``N/A``).
        calib_samples: tables written with the content-free instruction.
    """

    model: str = "smollm2-135m"
    template: str = "people"
    rows: int = 10
    samples: int = 50
    seed: int = 0
    mode: str = "exact"
    draws: str | None = None
    exact_columns: tuple[str, ...] | None = None
    temperature: float = 1.0
    batch_size: int = 50
    reference: Path | None = None
    target: str | None = "uniform"
    calibrate: bool = True
    calib_samples: int = 32

    def __post_init__(self) -> None:
        self.check_placement()
        for name in ("rows", "samples", "batch_size", "calib_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PrunescopeError(f"{name} must be an integer >= 1, got {value!r}")
        if self.mode not in MODES:
            raise PrunescopeError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.draws not in (None, *DRAWS):
            raise PrunescopeError(f"draws must be one of {', '.join(DRAWS)}, got {self.draws!r}")
        if not self.temperature > 0:
            raise PrunescopeError(f"temperature must be > 0, got {self.temperature!r}")
        if self.target not in (None, "uniform"):
            raise PrunescopeError(f"target must be 'uniform' (towards the reference) or none, got {self.target!r}")


@dataclass(frozen=True)
class FieldDistribution:
    """Distribution of one field (a choice cell, or one digit position of a digits cell) at one row.

    ``exact*`` are None in sampling mode. Probabilities are over ``values``; ``marginal`` values
    are unnormalised (the model's probability of writing that value at all), the others sum to 1.
    """

    row: int
    column: str
    position: int | None
    values: tuple[str, ...]
    reference: tuple[float, ...]
    distribution: tuple[float, ...]
    exact_marginal: tuple[float, ...] | None
    exact_low: tuple[float, ...] | None
    exact_high: tuple[float, ...] | None
    exact_prefixes: int
    mass_outside: float | None
    sampled_counts: tuple[int, ...]
    sampled_n: int
    sampled_outside: int
    wilson_low: tuple[float, ...]
    wilson_high: tuple[float, ...]
    entropy_bits: float
    kl_bits: float
    js_distance: float
    chi2: float | None
    chi2_p: float | None
    calibrated: tuple[float, ...] | None
    resampled: tuple[float, ...] | None
    acceptance_rate: float | None

    @property
    def label(self) -> str:
        return self.column if self.position is None else f"{self.column} digit {self.position}"


@dataclass(frozen=True)
class TextField:
    """A free-text cell at one row: first-token distribution (exact) and the sampled values."""

    row: int
    column: str
    first_tokens: tuple[tuple[str, float], ...]
    top_values: tuple[tuple[str, int], ...]
    distinct_values: int
    out_of_grammar: int


@dataclass(frozen=True)
class ProbeResult:
    """Everything a probe run measured; JSON-able, the reports are rendered from it."""

    model: str
    template: str
    instruction: str
    columns: tuple[str, ...]
    rows: int
    samples: int
    seed: int
    mode: str
    draws: str
    temperature: float
    chat_template: bool
    fields: tuple[FieldDistribution, ...]
    text_fields: tuple[TextField, ...]
    top_values: dict[str, tuple[tuple[str, int], ...]]
    first_words: dict[str, tuple[tuple[str, int], ...]]
    last_words: dict[str, tuple[tuple[str, int], ...]]
    seconds: float
    tables_per_minute: float

    def field(self, row: int, label: str) -> FieldDistribution:
        """The field at ``row`` (1-based) whose label is ``label`` (e.g. ``"Age digit 1"``)."""
        for f in self.fields:
            if f.row == row and f.label == label:
                return f
        raise KeyError(f"no field {label!r} at row {row}")


def load_reference(path: Path | None, template: Template) -> dict[str, dict[str, float]]:
    """Read ``{column: {value: probability}}``; columns left out are uniform."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PrunescopeError(f"reference file {path}: cannot read it as JSON/YAML: {exc}") from exc
    names = {c.name: c for c in template.columns if c.type != "text"}
    if not isinstance(data, dict) or any(k not in names for k in data):
        raise PrunescopeError(
            f"reference file {path}: expected a mapping from column ({', '.join(names)}) to {{value: probability}}"
        )
    out = {}
    for name, dist in data.items():
        allowed = names[name].choices if names[name].type == "choice" else DIGITS
        if not isinstance(dist, dict) or any(str(k) not in allowed for k in dist) or any(
            not isinstance(v, (int, float)) or v < 0 for v in dist.values()
        ):
            raise PrunescopeError(
                f"reference file {path}: column {name} must map values among {list(allowed)} to probabilities >= 0"
            )
        if sum(dist.values()) <= 0:
            raise PrunescopeError(f"reference file {path}: column {name} has no positive probability")
        out[name] = {str(k): float(v) for k, v in dist.items()}
    return out


def check_exact_columns(names: tuple[str, ...] | None, template: Template) -> None:
    """Raise unless every name in ``names`` is a column of ``template``."""
    valid = [c.name for c in template.columns]
    bad = [n for n in names or () if n not in valid]
    if bad or (names is not None and not names):
        raise PrunescopeError(f"exact columns {list(bad or names)} are not columns of template "
                              f"{template.name!r}; valid: {', '.join(valid)}")


def _reference(values: tuple[str, ...], column: str, refs: dict[str, dict[str, float]]) -> np.ndarray:
    if column not in refs:
        return np.full(len(values), 1.0 / len(values))
    return stats.normalise(np.array([refs[column].get(v, 0.0) for v in values]))


def _sampled_digits(tokens: list[list[int]], digit_ids: list[int], position: int) -> tuple[list[int], int]:
    """Digit indices written at ``position`` by tables still writing digits there, and their count."""
    index = {t: d for d, t in enumerate(digit_ids)}
    picks, n = [], 0
    for toks in tokens:
        if len(toks) > position and all(t in index for t in toks[:position]):
            n += 1
            if toks[position] in index:
                picks.append(index[toks[position]])
    return picks, n


def _floats(a) -> tuple[float, ...]:
    return tuple(float(x) for x in a)


def _field(row: int, col: Column, position: int | None, values: tuple[str, ...], exact: torch.Tensor | None,
           mass: torch.Tensor | None, picks: list[int], n: int, outside: int, ref: np.ndarray) -> FieldDistribution:
    """Assemble one field's distribution and statistics (calibration/resampling added later)."""
    counts = np.bincount(np.asarray(picks, dtype=int), minlength=len(values)) if picks else np.zeros(len(values), int)
    wl, wh = stats.wilson(counts, n)
    if exact is not None and exact.shape[0] > 0:
        marginal, low, high = stats.mean_band(exact.double().numpy())
        dist = stats.normalise(marginal)
        exact_fields = (_floats(marginal), _floats(low), _floats(high), int(exact.shape[0]), float(mass.double().mean()))
    else:
        dist = stats.normalise(counts)
        exact_fields = (None, None, None, 0, None)
    chi2, chi2_p = stats.chi_square(counts, ref)
    return FieldDistribution(
        row, col.name, position, values, _floats(ref), _floats(dist), *exact_fields,
        sampled_counts=tuple(int(c) for c in counts), sampled_n=n, sampled_outside=outside,
        wilson_low=_floats(wl), wilson_high=_floats(wh), entropy_bits=stats.entropy_bits(dist),
        kl_bits=stats.kl_bits(dist, ref), js_distance=stats.js_distance(dist, ref),
        chi2=chi2, chi2_p=chi2_p, calibrated=None, resampled=None, acceptance_rate=None,
    )


def fields_of_cell(row: int, col: Column, obs: CellObservations, digit_ids: list[int],
                   refs: dict[str, dict[str, float]]) -> list[FieldDistribution]:
    """The field distributions of one written cell: one for a choice, one per digit position."""
    outside = sum(not col.accepts(v) for v in obs.values)
    if col.type == "choice":
        index = {c: i for i, c in enumerate(col.choices)}
        picks = [index[v] for v in obs.values if v in index]
        ex = obs.exact[0] if obs.exact else None
        ms = obs.mass[0] if obs.mass else None
        ref = _reference(col.choices, col.name, refs)
        return [_field(row, col, None, col.choices, ex, ms, picks, len(obs.values), outside, ref)]
    out = []
    ref = _reference(DIGITS, col.name, refs)
    for j in range(col.max_length):
        picks, n = _sampled_digits(obs.tokens, digit_ids, j)
        ex = obs.exact[j] if j < len(obs.exact) else None
        ms = obs.mass[j] if j < len(obs.mass) else None
        if n == 0 and ex is None:
            continue
        out.append(_field(row, col, j + 1, DIGITS, ex, ms, picks, n, outside, ref))
    return out


def _text_field(row: int, col: Column, obs: CellObservations, tokenizer, top: int = 15) -> TextField:
    first: tuple[tuple[str, float], ...] = ()
    if obs.first_token is not None:
        p = obs.first_token / len(obs.values)  # (V,) mean first-token distribution
        vals, ids = torch.topk(p, min(top, p.numel()))
        first = tuple((tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, ids))
    counts = Counter(obs.values)
    return TextField(row, col.name, first, tuple(counts.most_common(top)), len(counts),
                     sum(not col.accepts(v) for v in obs.values))


def _debias(fields: list[FieldDistribution], content_free: dict[tuple[str, int | None], np.ndarray],
            target: str | None, seed: int) -> list[FieldDistribution]:
    """Add the calibrated distribution and the resampled-to-reference distribution to each field."""
    import dataclasses

    rng = np.random.default_rng(seed)
    out = []
    for f in fields:
        key = (f.column, f.position)
        cal = _floats(stats.calibrate(np.array(f.distribution), content_free[key])) if key in content_free else None
        res, acc = None, None
        if target is not None:
            picks = [i for i, c in enumerate(f.sampled_counts) for _ in range(c)]
            r, a = stats.resample_to_target(picks, np.array(f.distribution), np.array(f.reference), rng)
            res, acc = _floats(r), a
        out.append(dataclasses.replace(f, calibrated=cal, resampled=res, acceptance_rate=acc))
    return out


def _content_free(model, tokenizer, template: Template, config: ProbeConfig) -> dict:
    """Row-1 distributions with the instruction replaced by ``N/A`` (contextual calibration)."""
    obs = write_tables(model, tokenizer, template, 1, config.calib_samples, config.seed + 1,
                       config.temperature, exact=True, instruction=CONTENT_FREE,
                       batch_size=config.batch_size, draws=config.draws, exact_columns=config.exact_columns).cells
    from prunescope.probe.tables import build_prompt, build_vocab

    digit_ids = build_vocab(tokenizer, template, build_prompt(tokenizer, template, 1)).digits
    cf = {}
    for col, cell in zip(template.columns, obs[0]):
        if col.type != "text":
            for f in fields_of_cell(1, col, cell, digit_ids, {}):
                cf[(f.column, f.position)] = np.array(f.distribution)
    return cf


def run_probe_on(model, tokenizer, config: ProbeConfig, model_name: str | None = None) -> ProbeResult:
    """Probe an already loaded ``(model, tokenizer)``; see :func:`run_probe`."""
    if tokenizer is None:
        raise PrunescopeError(f"model {model_name or config.model!r} has no tokenizer; the probe needs one to write tables")
    template = load_template(config.template)
    check_exact_columns(config.exact_columns, template)
    refs = load_reference(config.reference, template)
    from prunescope.probe.tables import build_prompt, build_vocab

    digit_ids = build_vocab(tokenizer, template, build_prompt(tokenizer, template, config.rows)).digits
    exact = config.mode == "exact"
    t0 = time.perf_counter()
    obs = write_tables(model, tokenizer, template, config.rows, config.samples, config.seed,
                       config.temperature, exact=exact, batch_size=config.batch_size, draws=config.draws,
                       exact_columns=config.exact_columns).cells
    seconds = time.perf_counter() - t0
    fields: list[FieldDistribution] = []
    texts: list[TextField] = []
    for r, row in enumerate(obs, start=1):
        for col, cell in zip(template.columns, row):
            if col.type == "text":
                texts.append(_text_field(r, col, cell, tokenizer))
            else:
                fields.extend(fields_of_cell(r, col, cell, digit_ids, refs))
    cf = _content_free(model, tokenizer, template, config) if config.calibrate and exact else {}
    fields = _debias(fields, cf, config.target, config.seed)
    top, first, last = _name_counts(template, obs)
    return ProbeResult(
        model=model_name or config.model, template=template.name,
        instruction=template.instruction(config.rows), columns=tuple(c.name for c in template.columns),
        rows=config.rows, samples=config.samples, seed=config.seed, mode=config.mode,
        draws=config.draws or ("rqmc" if exact else "iid"),
        temperature=config.temperature, chat_template=bool(getattr(tokenizer, "chat_template", None)),
        fields=tuple(fields), text_fields=tuple(texts), top_values=top, first_words=first,
        last_words=last, seconds=seconds, tables_per_minute=60.0 * config.samples / max(seconds, 1e-9),
    )


def _name_counts(template: Template, obs: list[list[CellObservations]], top: int = 20) -> tuple[dict, dict, dict]:
    """Most frequent values, first words (first names) and last words (surnames) of text columns."""
    tops, firsts, lasts = {}, {}, {}
    for c, col in enumerate(template.columns):
        if col.type != "text":
            continue
        values = [v for row in obs for v in row[c].values if col.accepts(v)]
        words = [v.split() for v in values]
        tops[col.name] = tuple(Counter(values).most_common(top))
        firsts[col.name] = tuple(Counter(w[0] for w in words if w).most_common(top))
        lasts[col.name] = tuple(Counter(w[-1] for w in words if len(w) > 1).most_common(top))
    return tops, firsts, lasts


def load_for_probe(name: str, placement: models.Placement | None = None):
    """Load ``(model, tokenizer)``; a model folder without a tokenizer is a clear error (checked
    before the weights are loaded)."""
    models.load_tokenizer(models.resolve(name), name)
    return (placement or models.Placement()).load_model(name)


def run_probe(config: ProbeConfig) -> ProbeResult:
    """Load the model, write ``config.samples`` tables and measure every field's distribution."""
    template = load_template(config.template)  # fail on bad input before loading a model
    check_exact_columns(config.exact_columns, template)
    load_reference(config.reference, template)
    model, tokenizer = load_for_probe(config.model, config)
    return run_probe_on(model, tokenizer, config)
