"""Markdown and plots of an edit run (:class:`prunescope.edit.job.EditReport`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure

if TYPE_CHECKING:
    from prunescope.edit.job import EditReport, EditResult


def _pct(after: float, before: float) -> float:
    return 100.0 * (after / before - 1.0)


def _strength(result: "EditResult") -> str:
    """The strength as the tables show it, with the perplexity change it was matched to."""
    if result.matched_ppl_change is None:
        return f"{result.strength:g}"
    return f"{result.strength:.3g} (matched {result.matched_ppl_change:+g}% ppl)"


def results_table(report: "EditReport") -> str:
    """One row per kind and strength: target distance (fitted rows, held-out templates, later
    rows) against the side effects."""
    b = report.before
    rows = [("none", "-", b.target_js, b.target_js_noise, b.target_js_heldout, b.target_js_later_rows,
             b.target_reach, b.target_reach_heldout, b.target_off, b.target_off_heldout, b.ppl, 0.0, 0.0, 1.0, None,
             b.sampled_in_band, b.seconds)]
    rows += [(r.kind, _strength(r), r.target_js_after, r.target_js_noise, r.target_js_heldout,
              r.target_js_later_rows, r.target_reach, r.target_reach_heldout, r.target_off, r.target_off_heldout,
              r.ppl_after, _pct(r.ppl_after, r.ppl_before), r.kl_unrelated, r.top1_agreement, r.other_fields_js,
              r.sampled_in_band, r.seconds)
             for r in report.results]
    headers = ("kind", "strength", "target JS", "JS noise", "held-out JS", "later rows JS", "reach",
               "held-out reach", "off-target", "held-out off-target", "ppl", "ppl change %", "KL unrelated",
               "top-1 agree", "other fields JS", "sampled in band", "seconds")
    return markdown_table(headers, [tuple("n/a" if v is None else v for v in row) for row in rows], ".3f")


def fields_table(report: "EditReport") -> str:
    """The distributions of the targeted fields at row 1 before and after each edit."""
    lines = []
    for key, f in report.before.fields.items():
        if not key.startswith("row 1 / ") or key.split(" / ", 1)[1] not in report.target_fields:
            continue
        values = f["values"]
        rows = [("before", *f["distribution"])]
        rows += [(f"{r.kind} x{_strength(r)}", *r.fields[key]["distribution"])
                 for r in report.results if key in r.fields]
        lines.append(f"**{key}**\n\n" + markdown_table(("model", *values), rows, ".3f"))
    return "\n\n".join(lines)


def render_markdown(report: "EditReport") -> str:
    """The report a person reads: what was asked, the results table, the fields, the fit."""
    parts = [
        f"# prunescope edit: {report.model}",
        f"Template `{report.template}`, targets {', '.join(f'`{t}`' for t in report.targets)}, "
        f"edited layers {list(report.layers)}, {report.rows} fitted row(s), measured on "
        f"{report.measure_rows} rows; fitted on templates: {', '.join(report.fit_templates) or report.template}; "
        f"held-out templates: {', '.join(report.heldout_templates) or 'none'}. "
        f"{report.seconds:.0f} s in all." + _options_line(report.options),
        "Target JS is the mean Jensen-Shannon distance (base 2, 0 = the target exactly) between each "
        "targeted field's exact distribution and its target, on the fitted rows of the training "
        "template; JS noise: the target JS an edit that hit its targets exactly would show on these "
        "tables by chance alone (bootstrap over the tables: the earlier cells are sampled); "
        "held-out JS: the target JS on reworded templates; later rows JS: on the rows after the "
        "fitted ones. Reach: how often the targeted cells hold one of their field's values at all "
        "(the sum of the exact marginal; the distributions are renormalised over the values, so an "
        "edit that makes the model write something else in the cell can look close to its target "
        "while the cell is broken: read the JS next to the reach). "
        "Off-target: the share of the targeted fields' distributions on values their target excludes, "
        "which the JS distance weighs most (that share alone, the rest on target, reads about the "
        "square root of its half: 0.5% reads 0.05). "
        "Other fields JS: how far the fields no target names moved (those the unedited "
        "model writes with probability at least 0.05). A strength marked matched was searched for so "
        "that every kind changes perplexity by the same amount (--match-ppl). Sampled in band: the share of the "
        "targeted values whose exact probability lies in the 95% Wilson interval of the sampled tables "
        "(near 1 when the samples agree with the exact distribution: the tables' stratified draws "
        "are tighter than independent ones, and values never written with probability near 0 count "
        "as agreeing).",
        results_table(report),
        "## Targeted fields at row 1",
        fields_table(report),
    ]
    for title, t in (("Fit", report.fit_trace), ("Units fit", report.units_trace), ("Gated fit", report.gated_trace)):
        if t:
            term, unit = ("JS distance", "") if t.get("loss") == "js" else ("KL", " nats")
            parts.append(f"## {title}\n\n{len(t['target_kl'])} steps in {t['seconds']:.0f} s: target {term} (before "
                         f"each step) {t['target_kl'][0]:.4f} -> {t['target_kl'][-1]:.4f}{unit}, unrelated KL "
                         f"{t['unrelated_kl'][0]:.5f} -> {t['unrelated_kl'][-1]:.5f}." + _refresh_line(t)
                         + _templates_line(t, report.fit_templates) + _dropout_line(t) + _average_line(t))
    if report.gate:
        parts.append(gate_table(report.gate))
    if report.cell_norms:
        parts.append(cell_norm_table(report.cell_norms))
    return "\n\n".join(parts) + "\n"


def gate_table(gate: dict[str, Any]) -> str:
    """Where the gated fit's gates open: per layer, the share of positions with the gate more
    than half open on each sample (``EditReport.gate``)."""
    names = list(gate["positions"])
    rows = [(layer, *("n/a" if v is None else v for v in shares.values())) for layer, shares in gate["open_share"].items()]
    counts = ", ".join(f"{n} {c}" for n, c in gate["positions"].items() if c is not None)
    return ("## Gates\n\nShare of positions where each layer's gate is more than half open, read on the unedited "
            "model's MLP inputs (a linear classifier "
            "of the MLP's input trained on the fit tables against the fit text and each negative table "
            "(--gate-negative); the held-out tables, the side "
            "effects' text, the perplexity text and the bundled text were never seen by it; held-out cells: the "
            f"held-out tables' targeted cells alone, where the value is predicted). Positions: {counts}.\n\n"
            + markdown_table(("layer", *names), rows, ".4f"))


def cell_norm_table(norms: dict[str, Any]) -> str:
    """Per targeted cell (rows), the residual norm entering each edited layer at the cell over the
    median over its table, and the largest at any layer (``EditReport.cell_norms``)."""
    edited = norms["edited"]
    rows = []
    for name, ratio in norms["ratio"].items():
        top = max(range(len(ratio)), key=ratio.__getitem__)
        rows.append((name, *(ratio[i] for i in edited), f"{ratio[top]:.2f} (layer {top})"))
    return ("## Residual norm at the targeted cells\n\nPer targeted cell of each fit and held-out template, the "
            "residual stream's norm entering each edited layer at the cell (where the value is predicted) as a "
            "multiple of its median over the table's positions up to and including the cell, the median over the "
            "recorded tables, on the "
            f"unedited model (every layer: report.json `cell_norms`, cell-norms.png). At {norms['threshold']:g}x "
            "and more the cell carries a massive activation: a norm-bounded vector moves it little there and a "
            "gate trained on ordinary cells reads it as unlike them, so the edit reaches that wording less.\n\n"
            + markdown_table(("cell", *(f"layer {i}" for i in edited), "largest"), rows, ".2f"))


def plot_cell_norms(norms: dict[str, Any], path: str | Path) -> Path:
    """One line per targeted cell over the layers (``EditReport.cell_norms``), the edited layers
    shaded, the massive-activation threshold drawn, the cells that reach it named and the rest
    grey: where a wording's cells stand out."""
    from matplotlib.ticker import FormatStrFormatter

    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for layer in norms["edited"]:
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.9", zorder=0)
    ordinary = "every other cell"
    for name, ratio in norms["ratio"].items():
        if max(ratio) >= norms["threshold"]:
            ax.plot(range(len(ratio)), ratio, marker=".", label=name)
        else:
            ax.plot(range(len(ratio)), ratio, color="0.6", linewidth=0.8, label=ordinary)
            ordinary = "_nolegend_"
    ax.axhline(norms["threshold"], color="red", linestyle="--", linewidth=1, label=f"{norms['threshold']:g}x")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%gx"))
    ax.set_xlabel("decoder layer (edited layers shaded)")
    ax.set_ylabel("norm at the cell / median over its table")
    ax.set_title("Residual norm at the targeted cells")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _options_line(options: dict[str, Any]) -> str:
    """The run's settings (``EditReport.options``) as one sentence; empty for a report without them."""
    if not options:
        return ""
    return " Settings: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in options.items()) + "."


def _refresh_line(trace: dict[str, Any]) -> str:
    """When the contexts were re-recorded and how evenly the importance weights spread over them
    (used by the fit with --reweight; otherwise recorded only, as a measure of how far the edit
    drifted from the tables it was fitted on)."""
    steps = trace.get("refreshed_before") or []
    effective = trace.get("effective_tables") or []
    text = f" Contexts re-recorded before steps {', '.join(map(str, steps))}." if steps else ""
    if effective:
        used = "" if trace.get("reweighted") else " (not used: the contexts counted alike, without --reweight)"
        text += (f" Effective tables of the importance weights{used}: median {statistics.median(effective):.1f}, "
                 f"least {min(effective):.1f}.")
    return text


def _templates_line(trace: dict[str, Any], names: Sequence[str]) -> str:
    """Each fit template's target term before the last step, and how the fit combined them: the
    wordings the edit fits worst are where a held-out wording is likeliest to lag."""
    terms = trace.get("last_templates") or []
    if len(terms) < 2:
        return ""
    power = trace.get("template_power", 1.0)
    how = "their mean" if power == 1 else f"their power mean with exponent {power:g} (--template-power)"
    each = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, terms))
    return f" Target term per fit template before the last step, combined by {how}: {each}."


def _dropout_line(trace: dict[str, Any]) -> str:
    rate = trace.get("prompt_dropout") or 0
    unit = trace.get("prompt_dropout_unit") or "token"
    return (f" Each step read the templates after instructions with each {unit} left out with probability "
            f"{rate:g} (--prompt-dropout), drawn anew." if rate else "")


def _average_line(trace: dict[str, Any]) -> str:
    last = trace.get("average_last") or 1
    return (f" The edit kept is the mean of the fitted parameters after each of the last {last} steps "
            f"(--average-last)."
            if last > 1 else "")


def plot_pareto(report: "EditReport", path: str | Path) -> Path:
    """Target distance (held-out where measured) against the perplexity change, one line per kind
    over its strengths: the front a user chooses an edit from."""
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    use_heldout = all(r.target_js_heldout is not None for r in report.results)
    before = report.before.target_js_heldout if use_heldout else report.before.target_js
    ax.scatter([0.0], [before], color="black", zorder=3, label="unedited")
    for kind in dict.fromkeys(r.kind for r in report.results):
        runs = sorted((r for r in report.results if r.kind == kind), key=lambda r: r.strength)
        xs = [_pct(r.ppl_after, r.ppl_before) for r in runs]
        ys = [r.target_js_heldout if use_heldout else r.target_js_after for r in runs]
        ax.plot(xs, ys, marker="o", label=kind)
        for r, x, y in zip(runs, xs, ys):
            star = "*" if r.matched_ppl_change is not None else ""  # a strength matched to a perplexity change
            ax.annotate(f"x{r.strength:.3g}{star}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    changes = [abs(_pct(r.ppl_after, r.ppl_before)) for r in report.results]
    wide = max(changes, default=0.0) > 10.0
    if wide:  # linear within +-1%, logarithmic beyond: a broken model stays on the plot
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("perplexity change (%" + (", symmetric log scale)" if wide else ")"))
    ax.set_ylabel("target JS distance" + (" (held-out templates)" if use_heldout else ""))
    ax.set_title("Edits: distance to the target against the side effect")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
