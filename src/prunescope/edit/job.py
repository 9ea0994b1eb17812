"""The edit job: measure, fit each kind of edit, measure again, on the same footing.

One run: the probe's exact per-row distributions before any edit (on the training template, on
held-out rewordings of it, on rows beyond those fitted); then for each kind and strength the
same measurements with the edit applied by hooks (or, for ``weight``, by the changed weights),
plus the side effects: perplexity on the evaluation text, KL and top-1 agreement of next-token
distributions against the original on unrelated text, and the change of the fields no target
names. Every kind is built from the same recorded contexts: tables written on the training
template and the rewordings of it shipped for fitting (``fit_rewordings``: all of them unless
told otherwise) and given (``fit_template_files``), never the held-out ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunescope import data, evaluate, models
from prunescope.edit import fields, hooks, methods
from prunescope.edit.hooks import Edit, Gate, applied, require_gated
from prunescope.edit.rewordings import column_mismatch, fit_templates, heldout_templates
from prunescope.edit.targets import Target, parse_targets, rows_text
from prunescope.errors import PrunescopeError
from prunescope.pruning import apply
from prunescope.probe import stats
from prunescope.probe.tables import build_prompt, build_vocab, write_tables
from prunescope.probe.template import Template, load_template

log = logging.getLogger(__name__)

KINDS = ("fit", "units", "gated", "caa", "ablate", "weight", "weight-null")
FIT_WINDOWS = 64  # unrelated windows of 128 tokens for the fit: its KL term (--kl-windows of them), the key covariance
FIT_KL_WINDOWS = 8  # of those, the windows the fit's KL term runs on per step
DEFAULT_STRENGTHS = {"fit": (0.5, 1.0), "units": (0.5, 1.0), "gated": (0.5, 1.0), "caa": (0.05, 0.2),
                     "ablate": (1.0, 2.0), "weight": (1.0,), "weight-null": (1.0,)}
# the largest strength a perplexity match may try, where doubling on would only overshoot the
# targets: a gated vector barely touches the text perplexity is read on, so its match would
# otherwise end at 32 x the fitted vector; it stops at the fit's own strength
MATCH_LARGEST = {"gated": 1.0}
MIN_REACH = 0.05  # other fields reached less often than this are left out of other_fields_js
MATCH_DOUBLINGS = 6  # a kind's matched strength is searched up to 2**6 x its smallest default strength
MATCH_HALVINGS = 8
MEASURE_SEED = 1000  # the measured tables' seed offset; no fit recording ever uses it (fit_seed)


@dataclass(frozen=True)
class EditConfig(models.Placement):
    """Options of an edit run, validated on construction (see ``prunescope edit --help``)."""

    model: str = "smollm2-135m"
    template: str = "people"
    targets: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("fit",)
    layers: tuple[int, ...] | None = None
    strengths: tuple[float, ...] | None = None
    rows: int = 1
    measure_rows: int = 2
    fit_tables: int = 16
    measure_tables: int = 32
    steps: int = 30
    refresh_every: int = 10
    reweight: bool = False
    lr: float = 0.03
    lr_final: float = 1.0
    fit_loss: str = "kl"  # the fit's target term per field: "kl" or "js" (methods.TARGET_LOSSES)
    template_power: float = 1.0  # how the fit combines its templates' terms (methods.power_mean; 1: the mean)
    prompt_dropout: float = 0.0  # the share of instruction tokens the fit leaves out, anew each step
    prompt_dropout_unit: str = "token"  # what it leaves out: "token" or "word" (fields.THINNING_UNITS)
    average_last: int = 1  # the fitted edit kept: the mean of the vectors after each of the last this many steps
    kl_weight: float = 10.0
    max_norm: float = 0.5
    units: int = 8
    kl_windows: int = FIT_KL_WINDOWS
    holds: tuple[str, ...] = ()  # fields the fit holds at the unedited model's distribution (--hold)
    gate_negatives: tuple[str, ...] = ()  # other templates whose tables the gates learn to stay shut on
    match_ppl: tuple[float, ...] = ()
    heldout: tuple[Path, ...] = ()
    fit_rewordings: int | None = None  # None: every rewording the template ships for fitting
    fit_template_files: tuple[Path, ...] = ()
    eval_text: str = data.DEFAULT_TEXT
    eval_tokens: int = 8192
    eval_seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_placement()
        if not self.targets:
            raise PrunescopeError("give at least one --target FIELD=DIST (e.g. Age.digit1=uniform:2-6)")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise PrunescopeError(f"unknown edit kind {', '.join(bad) or '(none)'}; valid: {', '.join(KINDS)}")
        if len(set(self.kinds)) != len(self.kinds):
            raise PrunescopeError(f"edit kinds {', '.join(self.kinds)} name a kind twice")
        seen: dict[str, str] = {}
        for name in self.gate_negatives:
            same = str(Path(name).resolve()) if Path(name).is_file() else name
            if same in seen:
                raise PrunescopeError(f"--gate-negative {name} names the template of --gate-negative {seen[same]} "
                                      f"again; give each table once")
            seen[same] = name
        for name in ("rows", "measure_rows", "fit_tables", "measure_tables", "steps", "refresh_every", "units",
                     "eval_tokens", "eval_seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PrunescopeError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not isinstance(self.kl_windows, int) or not 1 <= self.kl_windows <= FIT_WINDOWS:
            raise PrunescopeError(f"kl-windows must be an integer from 1 to {FIT_WINDOWS}, got {self.kl_windows!r}")
        if self.fit_loss not in methods.TARGET_LOSSES:
            raise PrunescopeError(f"fit-loss must be {' or '.join(methods.TARGET_LOSSES)}, got {self.fit_loss!r}")
        if not np.isfinite(self.template_power) or self.template_power < 1:
            raise PrunescopeError(f"template-power must be a finite number >= 1 (1: the mean over the fit's "
                                  f"templates; e.g. 4 weighs the farthest more), got {self.template_power!r}")
        if not 0 <= self.prompt_dropout < 1:
            raise PrunescopeError(f"prompt-dropout must be a share in [0, 1) of the instruction's tokens (e.g. "
                                  f"0.15), got {self.prompt_dropout!r}")
        if self.prompt_dropout and self.reweight:
            raise PrunescopeError("--prompt-dropout and --reweight do not combine: the importance weights would "
                                  "compare the tables' probability after one thinned instruction with another")
        if not isinstance(self.average_last, int) or not 1 <= self.average_last <= self.steps:
            raise PrunescopeError(f"average-last must be an integer from 1 (the last step's vectors) to --steps "
                                  f"({self.steps}), got {self.average_last!r}")
        if self.prompt_dropout_unit not in fields.THINNING_UNITS:
            raise PrunescopeError(f"prompt-dropout-unit must be {' or '.join(fields.THINNING_UNITS)}, got "
                                  f"{self.prompt_dropout_unit!r}")
        if self.fit_rewordings is not None and (not isinstance(self.fit_rewordings, int) or self.fit_rewordings < 0):
            raise PrunescopeError(f"fit-rewordings must be an integer >= 0, got {self.fit_rewordings!r}")
        if self.measure_rows < self.rows:
            raise PrunescopeError(f"measure-rows ({self.measure_rows}) must be at least rows ({self.rows})")
        for name in ("lr", "lr_final", "kl_weight", "max_norm"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0 or (name != "kl_weight" and value == 0):
                raise PrunescopeError(f"{name.replace('_', '-')} must be a finite positive number, got {value!r}")
        for goal in self.match_ppl:
            if not np.isfinite(goal) or goal <= 0:
                raise PrunescopeError(f"match-ppl must be finite positive perplexity changes in percent (e.g. 1,2), "
                                      f"got {goal!r}")
        if self.strengths is not None and not self.strengths:
            raise PrunescopeError("--strength names no strength; give numbers such as 0.5,1")
        for s in self.strengths or ():
            if not np.isfinite(s):
                raise PrunescopeError(f"strength must be a finite number, got {s!r}")
        if self.eval_seqlen < 2 or self.eval_tokens < self.eval_seqlen:
            raise PrunescopeError(f"eval-tokens ({self.eval_tokens}) must be at least one window of eval-seqlen "
                                  f"({self.eval_seqlen}) tokens, and eval-seqlen at least 2")

    def strengths_for(self, kind: str) -> tuple[float, ...]:
        return self.strengths if self.strengths is not None else DEFAULT_STRENGTHS[kind]


@dataclass(frozen=True)
class Measurement:
    """One model state measured: target distance, side effects, the raw distributions."""

    target_js: float | None
    target_js_heldout: float | None
    target_js_later_rows: float | None
    target_js_noise: float | None
    ppl: float
    kl_unrelated: float
    top1_agreement: float
    other_fields_js: float | None
    sampled_in_band: float | None
    fields: dict[str, dict[str, Any]]
    seconds: float
    target_reach: float | None = None
    target_reach_heldout: float | None = None
    target_off: float | None = None
    target_off_heldout: float | None = None


@dataclass(frozen=True)
class EditResult:
    """One kind at one strength: the schema of ``report.json``'s ``results``."""

    kind: str
    strength: float
    target_js_before: float | None
    target_js_after: float | None
    target_js_heldout: float | None
    target_js_heldout_before: float | None
    target_js_later_rows: float | None
    ppl_before: float
    ppl_after: float
    kl_unrelated: float
    top1_agreement: float
    other_fields_js: float | None
    sampled_in_band: float | None
    seconds: float
    fit_seconds: float
    matched_ppl_change: float | None = None  # the perplexity change (%) this strength was matched to
    target_js_noise: float | None = None  # the target JS an exact hit would show on these tables (chance alone)
    # how often the targeted cells hold one of their field's values at all (the distributions
    # above are renormalised over the values; an edit can "reach" a target by breaking the cell)
    target_reach_before: float | None = None
    target_reach: float | None = None
    target_reach_heldout: float | None = None
    # the share of the targeted fields' distributions on values their target excludes: where
    # the JS distance is most sensitive (that mass alone reads about sqrt(mass / 2))
    target_off_before: float | None = None
    target_off: float | None = None
    target_off_heldout: float | None = None
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the log: the target distance and the side effects."""
        matched = "" if self.matched_ppl_change is None else f" (matched to {self.matched_ppl_change:+g}% perplexity)"
        return (f"{self.kind:<11} x{self.strength:<4g}{matched} target JS {_fmt(self.target_js_before)} -> "
                f"{_fmt(self.target_js_after)} (held-out {_fmt(self.target_js_heldout)}), perplexity "
                f"{self.ppl_before:.2f} -> {self.ppl_after:.2f} ({100 * (self.ppl_after / self.ppl_before - 1):+.1f}%), "
                f"top-1 agreement {self.top1_agreement:.3f}")


@dataclass(frozen=True)
class EditReport:
    model: str
    template: str
    targets: tuple[str, ...]
    target_fields: tuple[str, ...]
    layers: tuple[int, ...]
    rows: int
    measure_rows: int
    heldout_templates: tuple[str, ...]
    before: Measurement
    results: tuple[EditResult, ...]
    fit_trace: dict[str, Any] | None
    seconds: float
    fit_templates: tuple[str, ...] = ()  # the templates whose contexts every edit was built from
    options: dict[str, Any] = field(default_factory=dict)  # the fit's and the measurement's settings (run_options)
    units_trace: dict[str, Any] | None = None  # the units fit's FitTrace, as fit_trace is the vectors'
    gated_trace: dict[str, Any] | None = None  # the gated fit's FitTrace
    gate: dict[str, Any] | None = None  # the gated fit's gates: where they open (gate_report)
    cell_norms: dict[str, Any] | None = None  # the residual norm at the targeted cells per layer (cell_norm_report)


def run_options(config: EditConfig) -> dict[str, Any]:
    """The settings a report's figures depend on beyond its other fields (the fit's and the
    measurement's), so a report says how to make it again (as the config holds them: the JSON
    writer turns tuples into lists)."""
    names = ("steps", "lr", "lr_final", "kl_weight", "kl_windows", "max_norm", "units", "holds", "gate_negatives",
             "refresh_every", "reweight", "fit_loss", "template_power", "prompt_dropout", "prompt_dropout_unit",
             "average_last", "fit_tables", "measure_tables", "match_ppl", "strengths", "eval_text", "eval_tokens",
             "eval_seqlen", "seed")
    return {n: getattr(config, n) for n in names}


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """``"8-12"`` / ``"8,10"`` -> layer indices, each inside ``0..n_layers-1``."""
    out: list[int] = []
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise PrunescopeError(f"--layers {spec!r}: expected indices like 8-12 or 8,10") from None
        if first > last or first < 0 or last >= n_layers:
            raise PrunescopeError(f"--layers {spec!r}: layer {last if first <= last else first} is outside the "
                                  f"model's {n_layers} decoder layers (0-{n_layers - 1})")
        out.extend(range(first, last + 1))
    return tuple(dict.fromkeys(out))


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A block of about a sixth of the layers starting a quarter of the way in (7-11 of 30): early
    enough that the later layers can use the change, not tuned beyond that."""
    first = max(0, n_layers // 4)
    return tuple(range(first, min(n_layers, first + max(1, n_layers // 6))))


# ------------------------------------------------------------------------------------ measuring


@dataclass
class _Setting:
    """What every measurement shares: the templates, windows and the original model's logits."""

    template: Template
    heldout: list[Template]
    fitted_on: list[Template]  # the template first, then its fit rewordings
    targets: list[Target]
    eval_blocks: torch.Tensor
    fit_windows: torch.Tensor  # the fit's KL term and the weight edits' key covariance
    unrelated: torch.Tensor  # the side effects' KL and top-1 agreement (never fitted on)
    reference_logits: torch.Tensor | None = None
    before: dict[str, dict[str, np.ndarray]] | None = None
    holds: list[Target] = field(default_factory=list)  # fitted towards the unedited model's own distribution
    negatives: list[tuple[Template, list[Target]]] = field(default_factory=list)  # the gates' other tables
    negative_contexts: list[fields.Contexts] = field(default_factory=list)  # their tables, recorded
    heldout_contexts: list[tuple[Template, fields.Contexts]] = field(default_factory=list)  # (heldout_contexts)


def _field_distributions(model: nn.Module, tokenizer, template: Template, rows: int, tables: int,
                         seed: int, prompt_rows: int) -> dict[str, dict[str, Any]]:
    """``"row R / label" -> {values, distribution, sampled_counts, ...}`` for every non-text
    field of ``rows`` rows written after an instruction asking for ``prompt_rows`` rows."""
    from prunescope.probe.run import fields_of_cell

    instruction = template.instruction(prompt_rows)
    written = write_tables(model, tokenizer, template, rows, tables, seed, exact=True, instruction=instruction,
                           batch_size=min(tables, 32), progress=False)
    digit_ids = build_vocab(tokenizer, template, build_prompt(tokenizer, template, rows, instruction)).digits
    out = {}
    for r, row in enumerate(written.cells, start=1):
        for col, cell in zip(template.columns, row):
            if col.type == "text":
                continue
            for f in fields_of_cell(r, col, cell, digit_ids, {}):
                per_table = cell.exact[0 if f.position is None else f.position - 1] if cell.exact else None
                out[f"row {r} / {f.label}"] = {
                    "js_noise": None if per_table is None else stats.js_noise(per_table.double().numpy()),
                    "values": list(f.values), "distribution": list(f.distribution),
                    "exact_marginal": list(f.exact_marginal or ()), "sampled_counts": list(f.sampled_counts),
                    "sampled_n": f.sampled_n, "wilson_low": list(f.wilson_low), "wilson_high": list(f.wilson_high),
                }
    return out


def _targeted(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range
              ) -> Iterator[tuple[Target, dict[str, Any]]]:
    """(target, measured record) of every targeted field on ``rows`` that the tables reached."""
    for t in targets:
        for r in rows:
            got = dists.get(f"row {r} / {t.key.label}") if t.applies_to(r) else None
            if got is not None:
                yield t, got


def _target_js(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range) -> float | None:
    """Mean Jensen-Shannon distance between each targeted field's distribution and its target."""
    values = [stats.js_distance(np.array(got["distribution"]), t.as_array())
              for t, got in _targeted(dists, targets, rows)]
    return float(np.mean(values)) if values else None


def _target_reach(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range) -> float | None:
    """Mean over the targeted fields of their reach (:func:`_reach`): how often the tables' cells
    hold one of the field's values at all, the mass the renormalised distributions leave out."""
    values = [_reach(got) for _, got in _targeted(dists, targets, rows) if got["exact_marginal"]]
    return float(np.mean(values)) if values else None


def _target_off(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range) -> float | None:
    """Mean over the targeted fields of the mass their distribution puts on values the target
    excludes. The JS distance weighs that mass most: a mass ``m`` there, the rest exactly on
    target, reads about ``sqrt(m / 2)`` (0.5% reads 0.05), while the fit's KL(target || model)
    sees it only as the ``m`` nats the target values lack, and its gradient on a value's logit
    is about that value's probability: a small stray mass is the last to go."""
    values = [float(np.array(got["distribution"])[t.as_array() == 0].sum())
              for t, got in _targeted(dists, targets, rows)]
    return float(np.mean(values)) if values else None


def _target_noise(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range) -> float | None:
    """Mean over the targeted fields of their JS noise (``stats.js_noise``): the target JS an
    edit that reached its targets exactly would show on this many tables."""
    values = [got["js_noise"] for _, got in _targeted(dists, targets, rows)
              if got["js_noise"] is not None and np.isfinite(got["js_noise"])]
    return float(np.mean(values)) if values else None


def _sampled_in_band(dists: dict[str, dict[str, Any]], targets: list[Target], rows: range) -> float | None:
    """The sampled check: the share of the targeted fields' values whose exact probability lies
    inside the 95% Wilson interval of how often the tables really wrote it (about 0.95 when the
    edited model samples what its exact distribution says)."""
    hits = [lo - 1e-12 <= p <= hi + 1e-12
            for _, got in _targeted(dists, targets, rows) if got["exact_marginal"]
            for p, lo, hi in zip(got["exact_marginal"], got["wilson_low"], got["wilson_high"])]
    return float(np.mean(hits)) if hits else None


def _reach(field_record: dict[str, Any]) -> float:
    """How often a model writes the field at all: the sum of its exact marginal (an age's second
    digit is reached only by ages of two digits or more; a gender only where the cell holds one
    of the template's spellings)."""
    return float(sum(field_record["exact_marginal"])) if field_record["exact_marginal"] else 1.0


def _others_js(before: dict, after: dict, targets: list[Target]) -> float | None:
    """Mean JS distance before -> after over the fields no target names (side effect), each
    reached in at least ``MIN_REACH`` of the tables: a field the model almost never writes (a
    third digit of an age) has a renormalised distribution that is noise."""
    targeted = {t.key.label for t in targets}
    values = [stats.js_distance(np.array(after[k]["distribution"]), np.array(v["distribution"]))
              for k, v in before.items()
              if k.split(" / ", 1)[1] not in targeted and k in after and _reach(v) >= MIN_REACH]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def _measure(model: nn.Module, tokenizer, config: EditConfig, setting: _Setting) -> Measurement:
    start = time.perf_counter()
    seed = config.seed + MEASURE_SEED  # tables not used for fitting (fit_seed never gives it)
    main = _field_distributions(model, tokenizer, setting.template, config.measure_rows, config.measure_tables, seed,
                                config.measure_rows)
    heldout = [_field_distributions(model, tokenizer, t, config.rows, config.measure_tables, seed, config.measure_rows)
               for t in setting.heldout]
    fitted, later = range(1, config.rows + 1), range(config.rows + 1, config.measure_rows + 1)

    def held_mean(figure: Callable[[dict, list[Target], range], float | None]) -> float | None:
        """``figure`` on the fitted rows, averaged over the held-out templates that have it."""
        values = [v for v in (figure(h, setting.targets, fitted) for h in heldout) if v is not None]
        return float(np.mean(values)) if values else None

    ppl = evaluate.perplexity(model, setting.eval_blocks, progress=False)
    logits = model(input_ids=setting.unrelated.to(models.input_device(model))).logits.float()  # [n, L, V]
    if setting.reference_logits is None:
        setting.reference_logits = logits
    ref = torch.log_softmax(setting.reference_logits, dim=-1)
    kl = float(methods.next_token_kl(ref, logits))
    top1 = float((logits.argmax(-1) == setting.reference_logits.argmax(-1)).float().mean())
    merged = {**main, **{f"{t.name} / {k}": v for t, h in zip(setting.heldout, heldout) for k, v in h.items()}}
    return Measurement(
        target_js=_target_js(main, setting.targets, fitted),
        target_js_heldout=held_mean(_target_js),
        target_js_later_rows=_target_js(main, setting.targets, later),
        target_js_noise=_target_noise(main, setting.targets, fitted),
        ppl=ppl, kl_unrelated=kl, top1_agreement=top1,
        other_fields_js=None if setting.before is None else _others_js(setting.before, main, setting.targets),
        sampled_in_band=_sampled_in_band(main, setting.targets, fitted), fields=merged,
        seconds=time.perf_counter() - start, target_reach=_target_reach(main, setting.targets, fitted),
        target_reach_heldout=held_mean(_target_reach),
        target_off=_target_off(main, setting.targets, fitted),
        target_off_heldout=held_mean(_target_off),
    )


# ------------------------------------------------------------------------------------ the run


EditMaker = Callable[[float], "Edit | methods.WeightEdit"]


def _edit_family(kind: str, model: nn.Module, tokenizer, config: EditConfig, contexts: list[fields.Contexts],
                 targets: list[torch.Tensor], layers: tuple[int, ...], setting: _Setting, cache: dict[str, Any],
                 ) -> tuple[EditMaker, float]:
    """``kind``'s edits as a function of the strength, and the seconds it took to build them. The
    fit and the contrast vectors are computed once and shared by the kinds built on them."""
    start = time.perf_counter()
    fitted_as = kind if kind in ("units", "gated") else "fit" if kind in ("fit", "weight", "weight-null") else None
    if fitted_as is not None and fitted_as not in cache:
        latest = contexts

        def recontext(edit: Edit, refresh: int) -> list[fields.Contexts]:
            nonlocal latest
            with applied(model, edit):
                latest = record_fit_contexts(model, tokenizer, config, setting, refresh, latest)
            return latest

        gates = None
        if fitted_as == "gated":
            samples = gate_samples(model, setting, contexts, layers)
            negative = [x for name, x in samples.items() if name != "fit tables"]  # the text, each other table
            gates = methods.train_gates(model, samples["fit tables"], negative)
            cache["gate"] = gate_report(model, tokenizer, config, setting, gates, samples)
        edit, trace = methods.fit(model, contexts, targets, layers, setting.fit_windows[:config.kl_windows],
                                  config.steps, config.lr, config.kl_weight, config.max_norm, recontext,
                                  config.refresh_every, config.reweight, config.lr_final,
                                  config.units if fitted_as == "units" else 0, config.seed,
                                  min(FIT_KL_WINDOWS, config.kl_windows), gates, config.fit_loss,
                                  config.template_power, config.prompt_dropout, config.prompt_dropout_unit,
                                  config.average_last)
        cache[fitted_as], cache[f"{fitted_as}_trace"] = edit, trace
    if kind in ("caa", "ablate") and "contrast" not in cache:
        cache["contrast"] = methods.contrast(model, contexts, targets, layers)
        cache["norms"] = methods.residual_norms(model, setting.fit_windows[:FIT_KL_WINDOWS], layers)
    if kind in ("fit", "units", "gated"):
        make: EditMaker = cache[kind].scaled
    elif kind == "caa":
        make = lambda s: methods.caa_edit(cache["contrast"], s, cache["norms"])  # noqa: E731
    elif kind == "ablate":
        make = lambda s: methods.ablate_edit(cache["contrast"], s)  # noqa: E731
    else:
        vectors = {e.layer: e.add for e in cache["fit"].layers}
        make = methods.weight_edit(model, contexts, vectors, setting.fit_windows, null=kind == "weight-null").scaled
    return make, time.perf_counter() - start


def matched_strength(change: Callable[[float], float], goal: float, start: float,
                     doublings: int = MATCH_DOUBLINGS, halvings: int = MATCH_HALVINGS,
                     ) -> tuple[float, list[tuple[float, float]]]:
    """The strength whose side effect ``change(strength)`` comes nearest ``goal``, and every
    (strength, change) tried: from ``start``, doubled until the change reaches the goal (at most
    ``doublings`` times: a kind that never reaches it is measured at its largest strength), then
    bisected between the last strength below the goal and the first at or above it until the
    change is within a tenth of the goal (at most ``halvings`` times). Assumes the change grows
    with the strength on the whole, as it does for a vector's length or a direction's share."""
    tried: list[tuple[float, float]] = []

    def at(strength: float) -> float:
        tried.append((strength, change(strength)))
        log.info("strength %g: perplexity change %+.2f%% (goal %+.2f%%)", strength, tried[-1][1], goal)
        return tried[-1][1]

    lo, hi = 0.0, start
    for _ in range(doublings):
        if at(hi) >= goal:
            break
        lo, hi = hi, 2 * hi
    else:
        if at(hi) < goal:
            log.warning("strength %g still changes perplexity by less than %+.2f%%; measured there", hi, goal)
            return hi, tried
    for _ in range(halvings):
        if min(abs(c - goal) for _, c in tried) <= abs(goal) / 10:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) < goal else (lo, mid)
    return min(tried, key=lambda t: abs(t[1] - goal))[0], tried


def _strengths(kind: str, make: EditMaker, model: nn.Module, config: EditConfig, setting: _Setting,
               ppl_before: float) -> list[tuple[float, float | None, float]]:
    """(strength, the perplexity change it was matched to or None, seconds the match took) for
    every strength of ``kind`` to measure: the given or default ones, and for each ``match_ppl``
    goal the strength matched to it (alone when no strengths were given). The goals' searches
    share their perplexities (a strength is evaluated once)."""
    out: list[tuple[float, float | None, float]] = []
    if config.strengths is not None or not config.match_ppl:
        out = [(s, None, 0.0) for s in config.strengths_for(kind)]
    seen: dict[float, float] = {}

    def change(strength: float) -> float:
        if strength not in seen:
            with _applied(model, make(strength)):
                ppl = evaluate.perplexity(model, setting.eval_blocks, progress=False)
            seen[strength] = 100.0 * (ppl / ppl_before - 1.0)
        return seen[strength]

    first = min(DEFAULT_STRENGTHS[kind])
    doublings = MATCH_DOUBLINGS if kind not in MATCH_LARGEST else int(math.log2(MATCH_LARGEST[kind] / first))
    for goal in config.match_ppl:
        log.info("%s: the strength that changes perplexity by %+.2f%%", kind, goal)
        start = time.perf_counter()
        strength, _ = matched_strength(change, goal, first, doublings)
        reached = seen[strength] >= goal or abs(seen[strength] - goal) <= abs(goal) / 10
        matched = goal if reached or strength < first * 2 ** doublings else None  # else: its largest, short
        _add_strength(out, strength, matched, time.perf_counter() - start)
    return out


def _add_strength(out: list[tuple[float, float | None, float]], strength: float, matched: float | None,
                  seconds: float) -> None:
    """Add a strength to measure, once: a strength already listed (given by --strength, or found
    for an earlier goal) is measured once, labelled with the first goal it was matched to."""
    for j, (s, goal, spent) in enumerate(out):
        if s == strength:
            out[j] = (s, goal if goal is not None else matched, spent + seconds)
            return
    out.append((strength, matched, seconds))


def _applied(model: nn.Module, edit: Edit | methods.WeightEdit) -> AbstractContextManager[Any]:
    """The one way an edit is applied while measuring: hooks, or the weight deltas added (by
    hooks too when the weights are on disk)."""
    if isinstance(edit, methods.WeightEdit):
        return edit.hooked(model) if models.is_offloaded(model) else apply.added_to_weights(model, edit.named(model))
    return applied(model, edit)


def save_edited(model: nn.Module, tokenizer, edit: Edit | methods.WeightEdit, folder: Path,
                tolerance: float = 1e-3) -> float:
    """Fold ``edit`` into ``model`` (changed in place: biases and projected writers, or the
    weight deltas) and write a plain Hugging Face folder. Before the folder is published it is
    reloaded and its logits on a short text compared with the hooked model's: a difference above
    ``tolerance`` x the largest logit is an error and nothing is written. Returns the largest
    difference."""
    from transformers import AutoModelForCausalLM

    from prunescope import atomic
    from prunescope.edit.hooks import fold, save_edit

    probe_ids = torch.tensor([tokenizer("Generate a table of random people.")["input_ids"]])
    with torch.no_grad(), _applied(model, edit):
        hooked = model(input_ids=probe_ids.to(models.input_device(model))).logits.float().cpu()
    if isinstance(edit, methods.WeightEdit):
        apply.add_to_weights(model, edit.named(model))
        folded = model
    else:
        folded = fold(model, edit)
    with atomic.new_folder(folder) as tmp:
        folded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if isinstance(edit, Edit):
            save_edit(edit, tmp / "edit.safetensors")  # the vectors alone, for hooks (load_edit)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(folded.parameters()).dtype)
        with torch.no_grad():
            again = reloaded(input_ids=probe_ids).logits.float()
        diff = float((again - hooked).abs().max())
        if diff > tolerance * float(hooked.abs().max()):
            raise PrunescopeError(f"the folded model's logits differ from the edited model's by {diff:.3g}; "
                                  f"nothing was saved")
    return diff


def fit_seed(seed: int, refresh: int, template: int) -> int:
    """The seed of fit template ``template``'s tables at recording ``refresh`` (0: the first):
    ``seed + 100 * refresh + template``, moved past the measurement's seed once the offset
    reaches it (ten refreshes and more), so the fit never reads the tables it is measured on."""
    offset = 100 * refresh + template
    return seed + offset + (100 * MEASURE_SEED if offset >= MEASURE_SEED else 0)


GATE_HELDOUT_TABLES = 4  # tables per held-out template on which gate_report reads the gates
GATE_OTHER_WINDOWS = 16  # windows of 128 tokens of the bundled text on which gate_report reads the gates


def gate_samples(model: nn.Module, setting: _Setting, contexts: list[fields.Contexts], layers: Sequence[int],
                 ) -> dict[str, dict[int, torch.Tensor]]:
    """The MLP inputs the gates are trained on, per layer ``[positions, hidden]``: "fit tables"
    (every position of the fit's tables: open), "fit text" (the fit's windows: shut) and one
    "negative: NAME" per ``--gate-negative`` template (its recorded tables: shut)."""
    out = {"fit tables": methods.table_inputs(model, contexts, layers),
           "fit text": methods.text_inputs(model, setting.fit_windows, layers)}
    for (t, _), recorded in zip(setting.negatives, setting.negative_contexts, strict=True):
        out[f"negative: {t.name}"] = methods.table_inputs(model, [recorded], layers)
    return out


def negative_contexts(model: nn.Module, tokenizer, config: EditConfig, setting: _Setting) -> list[fields.Contexts]:
    """``config.fit_tables`` tables of each ``--gate-negative`` template as the unedited model
    writes them (seeds after the held-out ones' in :func:`gate_report`), recorded up to each of
    its choice and first-digit cells of the fitted rows."""
    first = len(setting.fitted_on) + len(setting.heldout)
    out = []
    for k, (t, fields_of) in enumerate(setting.negatives):
        try:
            out.append(fields.record_contexts(model, tokenizer, t, fields_of, config.rows, config.fit_tables,
                                              fit_seed(config.seed, 0, first + k), prompt_rows=config.measure_rows))
        except PrunescopeError as exc:
            raise PrunescopeError(f"--gate-negative {t.name}: {exc}") from exc
    return out


def gate_report(model: nn.Module, tokenizer, config: EditConfig, setting: _Setting, gates: dict[int, Gate],
                samples: dict[str, dict[int, torch.Tensor]]) -> dict[str, Any]:
    """Where the gated fit's gates open (g > 0.5), per layer, as shares of positions, read on the
    unedited model's MLP inputs (the classifier's own view: with the edit on, the layers after
    the first read inputs the earlier vectors changed): on what they were trained on
    (``samples`` from :func:`gate_samples`: the fit's tables, open; the fit's text windows and
    the negative tables, shut), on tables of the held-out templates (never seen: whether they
    generalize) and at their targeted cells alone (the positions where the field's value is
    predicted), on the side effects' windows and the perplexity text (never seen), and, when
    the evaluation text is another, on the bundled text (a different kind of text). JSON-ready."""
    held = [c for _, c in setting.heldout_contexts]
    layers = list(gates)
    samples = {"fit tables": samples["fit tables"],
               "held-out tables": methods.table_inputs(model, held, layers) if held else None,
               "held-out cells": methods.table_inputs(model, held, layers, cells_only=True) if held else None,
               **{name: x for name, x in samples.items() if name != "fit tables"},
               "unrelated text": methods.text_inputs(model, setting.unrelated, layers),
               "perplexity text": methods.text_inputs(model, setting.eval_blocks, layers),
               "bundled text": None}
    if config.eval_text != data.DEFAULT_TEXT:
        other = data.tokenize(tokenizer, data.load_text(data.DEFAULT_TEXT))
        windows = data.calibration_blocks(other, GATE_OTHER_WINDOWS, 128, config.seed + 13)
        samples["bundled text"] = methods.text_inputs(model, windows, layers)
    shares = {str(i): {name: None if x is None else methods.gate_share(model, i, gates[i], x[i])
                       for name, x in samples.items()} for i in layers}
    positions = {name: None if x is None else int(x[layers[0]].shape[0]) for name, x in samples.items()}
    return {"span": methods.GATE_SPAN, "sharpness": methods.GATE_SHARPNESS, "positions": positions,
            "open_share": shares}


def heldout_contexts(model: nn.Module, tokenizer, config: EditConfig, setting: _Setting,
                     ) -> list[tuple[Template, fields.Contexts]]:
    """``GATE_HELDOUT_TABLES`` tables of each held-out template as the unedited model writes them,
    recorded up to the targeted cells (seeds after the fit templates'): where the gates and the
    cells' norms are read on wordings never fitted. A template whose tables reach a targeted
    field nowhere is left out of those readings, with a warning (its measurement is unchanged)."""
    out = []
    for j, t in enumerate(setting.heldout):
        try:
            out.append((t, fields.record_contexts(model, tokenizer, t, setting.targets, config.rows, GATE_HELDOUT_TABLES,
                                                  fit_seed(config.seed, 0, len(setting.fitted_on) + j),
                                                  prompt_rows=config.measure_rows)))
        except PrunescopeError as exc:
            log.warning("held-out template %s: %s; the gates and the cells' norms are not read on it", t.name, exc)
    return out


MASSIVE_RATIO = 3.0  # a targeted cell's residual norm this many times its table's median: a massive activation


def cell_norm_report(model: nn.Module, setting: _Setting, contexts: list[fields.Contexts],
                     layers: Sequence[int]) -> dict[str, Any]:
    """Per targeted cell (``"TEMPLATE / row R / FIELD"``) of each fit and held-out template, per
    decoder layer, the residual norm entering the layer at the cell over the median over its
    table up to the cell (:func:`methods.cell_norms`, the unedited model), with a warning per
    cell carrying a massive activation (``MASSIVE_RATIO``) entering an edited layer: the layer's
    gate reads that state (normalized, after attention) as unlike the fitted cells, and a
    bounded vector added there moves it little (README, "Why one held-out wording lags"). JSON-ready."""
    pairs = [*zip(setting.fitted_on, contexts, strict=True), *setting.heldout_contexts]
    ratio = {f"{t.name} / {cell}": r for t, c in pairs
             for cell, r in methods.cell_norms(model, _targeted_only(c, setting.targets)).items()}
    count = len(next(iter(ratio.values()), []))
    ordinary = [i for i in range(count) if all(r[i] < MASSIVE_RATIO for r in ratio.values())]
    for name, r in ratio.items():
        hit = [i for i in layers if r[i] >= MASSIVE_RATIO]
        if hit:
            log.warning("%s: the residual stream entering layer%s %s is %s its median norm over the table at this cell "
                        "(a massive activation): an edit of that layer moves it little and its gate reads it as "
                        "unlike the fitted cells; layers where every targeted cell is under %gx: %s",
                        name, "s" if len(hit) > 1 else "", ", ".join(map(str, hit)),
                        "/".join(f"{r[i]:.1f}x" for i in hit), MASSIVE_RATIO, rows_text(ordinary) or "none")
    return {"threshold": MASSIVE_RATIO, "edited": list(layers), "ratio": ratio}


def _targeted_only(contexts: fields.Contexts, targets: list[Target]) -> fields.Contexts:
    """``contexts`` without the held fields' cells."""
    kept = tuple(f for f in contexts.fields if _named_by(f, targets))
    return dataclasses.replace(contexts, fields=kept)


def record_fit_contexts(model: nn.Module, tokenizer, config: EditConfig, setting: _Setting,
                        refresh: int, previous: list[fields.Contexts] | None = None) -> list[fields.Contexts]:
    """The fit's contexts from tables ``model`` writes (the edit so far applied by the caller),
    for the targeted and the held fields, one entry per fit template: ``config.fit_tables`` tables spread evenly over them, each
    template on its own seeds (:func:`fit_seed`; the training template's are those a fit on it
    alone uses). On a refresh (``previous``: the contexts in use) a template whose new tables
    reach a fitted field nowhere (the edit made the model stop writing a third age digit, say)
    keeps its previous contexts, with a warning, instead of ending the fit."""
    n = len(setting.fitted_on)
    shares = [config.fit_tables // n + (j < config.fit_tables % n) for j in range(n)]
    out = []
    for j, (t, tables) in enumerate(zip(setting.fitted_on, shares)):
        try:
            out.append(fields.record_contexts(model, tokenizer, t, setting.targets + setting.holds, config.rows,
                                              tables, fit_seed(config.seed, refresh, j),
                                              prompt_rows=config.measure_rows))
        except PrunescopeError as exc:
            if previous is None:
                raise PrunescopeError(f"fit template {t.name}: {exc}") from exc
            log.warning("refresh %d, fit template %s: %s; its previous contexts are kept", refresh, t.name, exc)
            out.append(previous[j])
    return out


def check_inputs(config: EditConfig) -> tuple[Template, list[Target], list[Template], list[Template]]:
    """The template, the targets, the held-out templates and the fit templates (the template
    first), every one checked (no model needed): a target row beyond the fitted rows is refused
    here, not silently left out."""
    template = load_template(config.template)
    targets = parse_targets(config.targets, template)
    for t in targets:
        beyond = [r for r in t.rows or () if r > config.rows]
        if beyond:
            raise PrunescopeError(f"target {t.describe()} names row {beyond[0]}, but the edit is fitted on "
                                  f"rows 1-{config.rows}; raise --rows or drop the row")
    parse_holds(config, template, targets)
    parse_negatives(config, template)
    heldout = heldout_templates(template, config.heldout)
    fitted_on = fit_templates(template, config.fit_rewordings, config.fit_template_files, heldout)
    if config.fit_tables < len(fitted_on):
        raise PrunescopeError(f"fit-tables ({config.fit_tables}) are spread over the {len(fitted_on)} fit templates "
                              f"({', '.join(t.name for t in fitted_on)}); give --fit-tables {len(fitted_on)} or "
                              f"more, or fewer --fit-rewordings / --fit-template")
    return template, targets, heldout, fitted_on


ADDS_VECTOR = ("fit", "units", "gated", "caa")  # kinds whose --save folds a vector into MLP biases


def check_save(model: nn.Module, kind: str) -> None:
    """Refuse ``--save`` of ``kind`` before minutes of measuring where its fold cannot be done: an
    added vector (gated or not) needs MLP biases the family has or can turn on in plain
    transformers (Llama's ``mlp_bias``; not Mistral, Qwen2, Qwen3, Phi-3)."""
    from prunescope import families

    family = families.family_for(model)
    if kind in ADDS_VECTOR and not hooks.can_hold_biases(family):
        raise PrunescopeError(f"--save folds the first kind ({kind}), an added vector, into MLP biases, which "
                              f"{family.name} does not have in plain transformers; drop --save, or put first a "
                              f"kind that folds into its weights (ablate, weight, weight-null)")


HOLD_KINDS = ("fit", "units", "gated")  # the kinds whose fit a --hold constrains


def parse_holds(config: EditConfig, template: Template, targets: list[Target]) -> list[Target]:
    """The fields ``--hold`` names, as targets on the fitted rows whose distribution the fit
    replaces by the unedited model's own (:func:`hold_targets`); one clear error for a field the
    template lacks, one a target already names, or kinds the hold cannot constrain."""
    if not config.holds:
        return []
    holds = parse_targets([f"{h}=uniform" for h in config.holds], template)
    named = {t.key for t in targets}
    for h in holds:
        if h.key in named:
            raise PrunescopeError(f"--hold {h.key.label}: that field is a --target; hold other fields")
    others = [k for k in config.kinds if k not in HOLD_KINDS]
    if others:
        raise PrunescopeError(f"--hold constrains the fit of {', '.join(HOLD_KINDS)}; drop it or the kinds "
                              f"{', '.join(others)}")
    return holds


def parse_negatives(config: EditConfig, template: Template) -> list[tuple[Template, list[Target]]]:
    """The ``--gate-negative`` templates (built-in names or files), each with the fields its
    tables are recorded up to (every choice column and every digits column's first digit); one
    clear error for a template that cannot be read, one with ``template``'s own columns (the
    gate would learn to stay shut on the table it edits), one with no such field, or no gated
    kind."""
    if not config.gate_negatives:
        return []
    if "gated" not in config.kinds:
        raise PrunescopeError("--gate-negative trains the gates of the gated fit; add gated to --method or drop it")
    out = []
    for name in config.gate_negatives:
        try:
            other = load_template(name)
            if column_mismatch(template.columns, other.columns) is None:
                raise PrunescopeError(f"it has the columns of template {template.name}: the gates would learn to "
                                      f"stay shut on the table they edit; give a template of another table")
            fields_of = table_fields(other)
        except PrunescopeError as exc:
            raise PrunescopeError(f"--gate-negative {name}: {exc}") from exc
        out.append((replace(other, name=name), fields_of))
    return out


def table_fields(template: Template) -> list[Target]:
    """Every choice column and every digits column's first digit of ``template``, as fields to
    record its tables up to (a negative table's, or another table's the gates are read on)."""
    keys = [c.name if c.type == "choice" else f"{c.name}.digit1" for c in template.columns if c.type != "text"]
    if not keys:
        raise PrunescopeError(f"template {template.name} has no choice or digits column to record its tables up to")
    return parse_targets([f"{k}=uniform" for k in keys], template)


@torch.no_grad()
def hold_targets(model: nn.Module, contexts: list[fields.Contexts], index: int) -> torch.Tensor:
    """The target of the fit's field ``index`` when it is held: the unedited model's ``[values]``
    marginal on the fit's contexts, the mean over the templates."""
    return torch.stack([fields.marginals(model, c)[index] for c in contexts]).mean(0).float().cpu()


def check_layers(layers: tuple[int, ...], n_layers: int) -> None:
    """Every layer inside the model (for configs built in code; the CLI parses them checked)."""
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise PrunescopeError(f"layer {bad[0] if bad else '(none)'} is outside the model's {n_layers} decoder "
                              f"layers (0-{n_layers - 1})")


def _windows(tokenizer, config: EditConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Perplexity windows (the first ``eval_tokens`` tokens), then from the rest of the text,
    apart from each other: the fit's windows (its KL term, the key covariance: 64 x 128 tokens)
    and the side effects' windows (8 x 128), so no side effect is measured on fitted text."""
    text = data.tokenize(tokenizer, data.load_text(config.eval_text))
    blocks = data.eval_blocks(text, config.eval_seqlen, config.eval_tokens)
    rest = text[blocks.numel():]
    length = min(128, config.eval_seqlen)
    half = rest.numel() // 2
    if half < FIT_WINDOWS * length:
        raise PrunescopeError(
            f"the evaluation text has {text.numel()} tokens: after the {blocks.numel()} used for perplexity, "
            f"{2 * FIT_WINDOWS * length} more are needed for the fit's and the side effects' windows; give a longer "
            f"--eval-text or fewer --eval-tokens")
    fit = data.calibration_blocks(rest[:half], FIT_WINDOWS, length, config.seed + 7)
    unrelated = data.calibration_blocks(rest[half:], 8, length, config.seed + 11)
    return blocks, fit, unrelated


def new_setting(config: EditConfig, tokenizer) -> _Setting:
    """What every measurement of ``config`` shares: its checked templates and targets
    (:func:`check_inputs`), the holds, the gates' negative templates and the text windows."""
    template, targets, heldout, fitted_on = check_inputs(config)
    blocks, fit_windows, unrelated = _windows(tokenizer, config)
    return _Setting(template, heldout, fitted_on, targets, blocks, fit_windows, unrelated,
                    holds=parse_holds(config, template, targets), negatives=parse_negatives(config, template))


def run_edit_on(model: nn.Module, tokenizer, config: EditConfig, model_name: str | None = None,
                built: dict[tuple[str, float], Any] | None = None) -> EditReport:
    """Measure, build every kind of edit at every strength, measure each; see the module docstring.

    ``built``, when given, receives every edit: ``(kind, strength) -> Edit`` (vectors and
    directions, applied by hooks) or ``WeightEdit`` (weight deltas)."""
    t0 = time.perf_counter()
    setting = new_setting(config, tokenizer)
    template, targets = setting.template, setting.targets
    n_layers = len(models.adapter_for(model).layers(model))
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    check_layers(layers, n_layers)
    if {"units", "gated"} & set(config.kinds):
        require_gated(model)  # before minutes of measuring
    warn_shared_columns(setting)
    if not setting.heldout:
        log.warning("no held-out rewordings of template %s: give --heldout FILE to measure generalization", template.name)
    # the contexts first: a target no fitted table reaches fails before minutes of measuring
    contexts = record_fit_contexts(model, tokenizer, config, setting, 0)
    setting.negative_contexts = negative_contexts(model, tokenizer, config, setting)
    setting.heldout_contexts = heldout_contexts(model, tokenizer, config, setting)
    norms = cell_norm_report(model, setting, contexts, layers)
    wanted = [hold_targets(model, contexts, j) if _named_by(f, setting.holds) else torch.tensor(_target_of(f, targets).probs)
              for j, f in enumerate(contexts[0].fields)]  # per fitted field: its target, or a hold's own
    log.info("measuring the unedited model")
    before = _measure(model, tokenizer, config, setting)
    setting.before = {k: v for k, v in before.fields.items() if k.startswith("row ")}
    cache: dict[str, Any] = {}
    results = []
    for kind in config.kinds:
        make, build_seconds = _edit_family(kind, model, tokenizer, config, contexts, wanted, layers, setting, cache)
        for strength, matched, search_seconds in _strengths(kind, make, model, config, setting, before.ppl):
            edit = make(strength)
            if built is not None:
                built[(kind, strength)] = edit
            with _applied(model, edit):
                after = _measure(model, tokenizer, config, setting)
            result = EditResult(
                kind, strength, before.target_js, after.target_js, after.target_js_heldout,
                before.target_js_heldout, after.target_js_later_rows, before.ppl, after.ppl,
                after.kl_unrelated, after.top1_agreement, after.other_fields_js, after.sampled_in_band,
                seconds=after.seconds + build_seconds + search_seconds, fit_seconds=build_seconds,
                matched_ppl_change=matched, target_js_noise=after.target_js_noise,
                target_reach_before=before.target_reach, target_reach=after.target_reach,
                target_reach_heldout=after.target_reach_heldout, target_off_before=before.target_off,
                target_off=after.target_off, target_off_heldout=after.target_off_heldout, fields=after.fields,
            )
            log.info("%s", result.line())
            results.append(result)
    traces = {k: None if cache.get(f"{k}_trace") is None else dataclasses.asdict(cache[f"{k}_trace"])
              for k in ("fit", "units", "gated")}
    return EditReport(
        model_name or config.model, template.name, config.targets, tuple(dict.fromkeys(t.key.label for t in targets)),
        tuple(layers), config.rows, config.measure_rows, tuple(t.name for t in setting.heldout), before,
        tuple(results), traces["fit"], time.perf_counter() - t0, tuple(t.name for t in setting.fitted_on),
        run_options(config), traces["units"], traces["gated"], cache.get("gate"), norms,
    )


def warn_shared_columns(setting: _Setting) -> list[str]:
    """Warn about, and return, each negative table's first column that a target or a hold names:
    the gates must then tell its cells from the edited table's by the rest of the context."""
    out = []
    for t, _ in setting.negatives:
        shared = sorted({f.key.column for f in setting.targets + setting.holds} & {c.name for c in t.columns})
        if shared:
            log.warning("--gate-negative %s has the column %s the edit fits: the gates must tell its cells from the "
                        "edited table's by the rest of the context alone", t.name, shared[0])
            out.append(shared[0])
    return out


def _named_by(field_contexts: fields.FieldContexts, targets: list[Target]) -> bool:
    """Whether one of ``targets`` (or of the holds) names this field at its row."""
    return any(t.key == field_contexts.key and t.applies_to(field_contexts.row) for t in targets)


def _target_of(field_contexts: fields.FieldContexts, targets: list[Target]) -> Target:
    for t in targets:
        if t.key == field_contexts.key and t.applies_to(field_contexts.row):
            return t
    raise AssertionError(f"no target for {field_contexts.key}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


