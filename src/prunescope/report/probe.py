"""Render a :class:`~prunescope.probe.ProbeResult` as Markdown and PNG plots (heatmap of row x
leading digit, choice shares per row, top first names and surnames)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunescope.probe.run import FieldDistribution, ProbeResult
from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or x != x or x in (float("inf"), float("-inf")) else format(x, fmt)


def field_table(f: FieldDistribution) -> str:
    """One field: each value's exact marginal (95% band), distribution, sampled count and debiased shares."""
    rows = []
    for i, v in enumerate(f.values):
        exact = "n/a" if f.exact_marginal is None else (
            f"{_pct(f.exact_marginal[i])} [{_pct(f.exact_low[i])}, {_pct(f.exact_high[i])}]"
        )
        sampled = f"{f.sampled_counts[i]}/{f.sampled_n} [{_pct(f.wilson_low[i])}, {_pct(f.wilson_high[i])}]"
        rows.append((
            v, exact, _pct(f.distribution[i]), sampled, _pct(f.reference[i]),
            _pct(f.calibrated[i]) if f.calibrated else "n/a", _pct(f.resampled[i]) if f.resampled else "n/a",
        ))
    return markdown_table(
        ["value", "exact P(write value) [95% band]", "distribution", "sampled [Wilson 95%]", "reference",
         "calibrated", "resampled to reference"], rows,
    )


def stats_table(result: ProbeResult) -> str:
    """Every row x field: entropy, KL, JS distance, chi-square p, mass outside, most likely value."""
    rows = []
    for f in result.fields:
        k = int(np.argmax(f.distribution))
        rows.append((
            f.row, f.label, f"{f.values[k]} ({_pct(f.distribution[k])})", _num(f.entropy_bits),
            _num(np.log2(len(f.values))), _num(f.kl_bits), _num(f.js_distance), _num(f.chi2_p, ".2g"),
            _pct(f.mass_outside), f"{f.sampled_outside}",
            _num(f.acceptance_rate),
        ))
    return markdown_table(
        ["row", "field", "top value", "entropy (bits)", "max entropy", "KL to ref (bits)", "JS distance",
         "chi-square p (sampled)", "mass outside (exact)", "sampled out of grammar", "resampling acceptance"],
        rows,
    )


def _words_table(result: ProbeResult) -> str:
    parts = []
    for col, top in result.top_values.items():
        firsts, lasts = result.first_words.get(col, ()), result.last_words.get(col, ())
        n = max(len(top), len(firsts), len(lasts), 0)
        n = min(n, 12)
        cell = lambda seq, i: f"{seq[i][0]} ({seq[i][1]})" if i < len(seq) else ""  # noqa: E731
        rows = [(i + 1, cell(top, i), cell(firsts, i), cell(lasts, i)) for i in range(n)]
        parts.append(f"### {col}\n\n" + markdown_table(["rank", "value", "first word", "last word"], rows))
    return "\n\n".join(parts)


def render_markdown(result: ProbeResult) -> str:
    """The human-readable report, rendered from the result alone."""
    summary = markdown_table(["", "value"], [
        ("model", result.model), ("template", result.template), ("instruction", result.instruction),
        ("chat template", "yes" if result.chat_template else "no (plain prompt)"),
        ("tables x rows", f"{result.samples} x {result.rows}"), ("mode", result.mode), ("draws", result.draws),
        ("seed, temperature", f"{result.seed}, {result.temperature}"),
        ("time", f"{result.seconds:.1f} s ({result.tables_per_minute:.1f} tables/min)"),
    ])
    text = f"# prunescope probe: {result.model}\n\n{summary}\n\n"
    text += "![row x leading digit](probe-digits.png)\n\n![choices per row](probe-choices.png)\n\n"
    text += "![top names](probe-names.png)\n\n## Row 1\n\n"
    for f in result.fields:
        if f.row == 1:
            text += f"### {f.label}\n\n{field_table(f)}\n\n"
    text += f"## Every row and field\n\n{stats_table(result)}\n\n## Most frequent sampled values\n\n"
    return text + _words_table(result) + "\n"


def _matrix(result: ProbeResult, label: str) -> tuple[np.ndarray, tuple[str, ...]]:
    fields = sorted((f for f in result.fields if f.label == label), key=lambda f: f.row)
    if not fields:
        return np.zeros((0, 0)), ()
    return np.array([f.distribution for f in fields]), fields[0].values


def plot_digits(result: ProbeResult, path: str | Path) -> Path | None:
    """Heatmap row position x leading digit of the first digits column (None if there is none)."""
    label = next((f.label for f in result.fields if f.position == 1), None)
    if label is None:
        return None
    mat, values = _matrix(result, label)
    fig = new_figure(width=7.0, height=1.2 + 0.35 * mat.shape[0])
    ax = fig.add_subplot()
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(mat))))
    for (r, c), v in np.ndenumerate(mat):
        ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 * np.nanmax(mat) else "black")
    ax.set_xticks(range(len(values)), values)
    ax.set_yticks(range(mat.shape[0]), [str(r + 1) for r in range(mat.shape[0])])
    ax.set_xlabel(f"{label} (tens digit of a two-digit value)")
    ax.set_ylabel("row")
    ax.set_title(f"{result.model}: P({label} | row), {result.mode} mode, {result.samples} tables (%)")
    fig.colorbar(im, ax=ax, label="probability")
    return save_figure(fig, path)


def plot_choices(result: ProbeResult, path: str | Path) -> Path | None:
    """Stacked shares of the first choice column's options per row."""
    label = next((f.label for f in result.fields if f.position is None), None)
    if label is None:
        return None
    mat, values = _matrix(result, label)
    fig = new_figure(width=7.0, height=4.0)
    ax = fig.add_subplot()
    bottom = np.zeros(mat.shape[0])
    rows = np.arange(1, mat.shape[0] + 1)
    for k, v in enumerate(values):
        ax.bar(rows, mat[:, k], bottom=bottom, label=v)
        bottom += mat[:, k]
    ax.axhline(0.5, color="gray", linestyle=":")
    ax.set_xlabel("row")
    ax.set_ylabel("share")
    ax.set_xticks(rows)
    ax.set_title(f"{result.model}: {label} per row ({result.mode} mode)")
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


def _printable(text: str) -> str:
    """Replace characters the plot font cannot draw (control characters from garbage output)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "''"


def plot_names(result: ProbeResult, path: str | Path, top: int = 15) -> Path | None:
    """Horizontal bars of the most frequent first words and last words of the first text column."""
    col = next(iter(result.first_words), None)
    if col is None:
        return None
    fig = new_figure(width=9.0, height=5.0)
    for k, (title, seq) in enumerate((("first names", result.first_words[col]), ("surnames", result.last_words[col]))):
        ax = fig.add_subplot(1, 2, k + 1)
        seq = seq[:top][::-1]
        ax.barh([_printable(s) for s, _ in seq], [c for _, c in seq], color="tab:blue" if k == 0 else "tab:orange")
        ax.set_title(f"{col}: top {title}")
        ax.set_xlabel(f"count over {result.samples} tables x {result.rows} rows")
        ax.tick_params(axis="y", labelsize=7)
    return save_figure(fig, path)


def write_plots(result: ProbeResult, out: str | Path) -> list[Path]:
    """All plots of a probe report into ``out``; returns the files written."""
    out = Path(out)
    made = [plot_digits(result, out / "probe-digits.png"), plot_choices(result, out / "probe-choices.png"),
            plot_names(result, out / "probe-names.png")]
    return [p for p in made if p is not None]
