"""Render an :class:`~prunescope.activations.job.ActivationsResult` (Markdown and PNG plots)
and a :class:`~prunescope.activations.study.StudyResult`; everything is drawn from the result."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure

if TYPE_CHECKING:
    from prunescope.activations.job import ActivationsResult
    from prunescope.activations.profiler import Profile
    from prunescope.activations.stats import SiteStats
    from prunescope.activations.study import StudyResult


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def site_table(profile: "Profile") -> str:
    """Per site: activation, width, exact zeros, near-zero per eps, dead neurons, token sparsity."""
    eps = [f"{e:g}" for e in profile.eps]
    headers = ["site", "activation", "width", "zeros", *[f"abs<{e} rms" for e in eps],
               "dead (never >0)", f"dead (abs<{min(profile.eps):g} rms)", f"token sparsity (abs<{profile.token_eps:g})"]
    rows = [(s.name, s.activation, s.width, _pct(s.zero_frac), *[_pct(s.near_zero_frac[e]) for e in eps],
             s.dead_neurons, s.dead_neurons_eps, _pct(s.token_sparsity_mean)) for s in profile.sites]
    return markdown_table(headers, rows)


def linear_table(profile: "Profile") -> str:
    """Per Linear: weight density, input density, product, exact effective multiply-adds."""
    e = f"{profile.token_eps:g}"
    rows = [(c.name, "x".join(map(str, c.shape)), _pct(c.weight_density), _pct(c.input_density),
             _pct(c.input_density_eps.get(e, float("nan"))), _pct(c.product), _pct(c.effective_mac_frac))
            for c in profile.linears]
    return markdown_table(["Linear", "shape", "weight density", "input density (non-zero)",
                           f"input abs>={e} rms", "product", "effective MACs (exact)"], rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summary(result: "ActivationsResult") -> str:
    p = result.profile
    acts = p.activation_sites()
    e = f"{p.token_eps:g}"
    rows = [
        ("model", f"{result.model} ({result.model_info.get('class')}, {result.model_info.get('parameters', 0):,} parameters)"),
        ("text", f"{p.tokens:,} tokens of {result.text!r} in {p.seqlen}-token windows"),
        ("activation sites", f"{len(acts)} ({', '.join(sorted({s.activation for s in acts}))})"),
        ("mean exact zeros (activations)", _pct(_mean([s.zero_frac for s in acts]))),
        (f"mean abs<{e} rms (activations)", _pct(_mean([s.near_zero_frac[e] for s in acts])) if e in acts[0].near_zero_frac else "n/a"),
        ("dead neurons (never >0), all activations", f"{sum(s.dead_neurons for s in acts):,} of {sum(s.width for s in acts):,}"),
        ("statistics", f"exact zeros and dead neurons on every token; histograms on 1/{p.sample_every} of the tokens "
                       f"(a contiguous run per batch); RMS {p.rms_mode}"),
        ("profiling time", f"{p.seconds:.1f} s"),
    ]
    return markdown_table(["", "value"], rows)


def threshold_table(result: "ActivationsResult") -> str:
    """Target sparsity, reached sparsity and perplexity of the threshold sweep."""
    sweep = result.threshold
    if sweep is None:
        return ""
    rows = [(_pct(p.target), _pct(p.actual), f"{p.ppl:.3f}") for p in sweep.points]
    return markdown_table(["target sparsity", "reached (eval)", "perplexity"], rows)


def swap_table(result: "ActivationsResult") -> str:
    """Perplexity and mean activation sparsity before and after the swap."""
    swap = result.swap
    if swap is None:
        return ""
    before, after = result.profile.activation_sites(), swap.profile_after.activation_sites()
    e = _measured_eps(result.profile.token_eps, result.profile.eps, [*before, *after])
    fam = ", ".join(sorted(set(swap.replaced.values())))
    rows = [
        (f"before ({fam})", f"{swap.ppl_before:.3f}", _pct(_mean([s.zero_frac for s in before])),
         _pct(_mean([s.near_zero_frac[e] for s in before])), sum(s.dead_neurons for s in before)),
        (f"after ({swap.to})", f"{swap.ppl_after:.3f}", _pct(_mean([s.zero_frac for s in after])),
         _pct(_mean([s.near_zero_frac[e] for s in after])), sum(s.dead_neurons for s in after)),
    ]
    return markdown_table(["activation", "perplexity", "exact zeros", f"abs<{e} rms", "dead neurons"], rows)


def _measured_eps(token_eps: float, eps: tuple[float, ...], sites: list["SiteStats"]) -> str:
    """The key of the near-zero fraction to show: ``token_eps`` where every site measured it,
    else the first of ``--eps`` (the fractions are measured only at those)."""
    for key in (f"{token_eps:g}", *(f"{x:g}" for x in eps)):
        if all(key in s.near_zero_frac for s in sites):
            return key
    return f"{eps[0]:g}"


def render_markdown(result: "ActivationsResult") -> str:
    """The human-readable report."""
    text = f"# prunescope activations: {result.model}\n\n{_summary(result)}\n\n"
    text += "![sparsity per layer](sparsity.png)\n\n![histograms](histograms.png)\n\n![dead neurons](dead.png)\n\n"
    if result.threshold is not None:
        t = result.threshold
        text += (f"## Threshold sparsity (TEAL-style, uniform)\n\n{len(t.linears)} Linear inputs thresholded; "
                 f"calibrated on {t.calib_tokens:,} tokens of {t.calib_text!r}, perplexity on {t.eval_tokens:,} "
                 f"tokens of {t.eval_text!r} ({t.eval_seqlen}-token windows).\n\n![threshold](threshold.png)\n\n"
                 f"{threshold_table(result)}\n\n")
    if result.swap is not None:
        text += (f"## Activation swap to {result.swap.to}\n\n{len(result.swap.replaced)} modules replaced, no "
                 f"fine-tuning; perplexity on {result.swap.eval_tokens:,} tokens of {result.swap.eval_text!r}.\n\n"
                 f"{swap_table(result)}\n\n")
    return text + (f"## Per site\n\n{site_table(result.profile)}\n\n## Linear layers: weight x input density\n\n"
                   f"{linear_table(result.profile)}\n")


def _layer_series(sites: tuple["SiteStats", ...]) -> dict[str, list["SiteStats"]]:
    """Group sites by their role (the name with the layer index removed), in model order."""
    groups: dict[str, list] = {}
    for s in sites:
        role = ".".join(p for p in s.name.split(".") if not p.isdigit())
        groups.setdefault(role, []).append(s)
    return groups


def plot_sparsity(result: "ActivationsResult", path: str | Path) -> Path:
    """Near-zero fraction (token eps) and exact zeros per layer, one line per site role."""
    p = result.profile
    e = _measured_eps(p.token_eps, p.eps, list(p.sites))
    fig = new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    for role, sites in _layer_series(p.sites).items():
        if len(sites) < 2:
            continue
        line, = ax.plot([100 * s.near_zero_frac[e] for s in sites], marker=".", label=f"{role} abs<{e} rms")
        if max(s.zero_frac for s in sites) > 0.001:
            ax.plot([100 * s.zero_frac for s in sites], linestyle="--", color=line.get_color(), label=f"{role} exact 0")
    ax.set_xlabel("layer")
    ax.set_ylabel("values (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.model}: activation sparsity per layer ({p.tokens:,} tokens)")
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_histograms(result: "ActivationsResult", path: str | Path, n: int = 3) -> Path:
    """Value histograms (in RMS units, log counts) of the first, a middle and the last activation,
    and their per-token sparsity distributions."""
    acts = list(result.profile.activation_sites()) or list(result.profile.sites)
    picks = [acts[i] for i in sorted({0, len(acts) // 2, len(acts) - 1})][:n]
    fig = new_figure(4.0 * len(picks), 6.0)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, s in enumerate(picks):
        k = len(s.hist_counts)
        width = 2 * s.hist_range / k
        centres = [-s.hist_range + (i + 0.5) * width for i in range(k)]
        axes[0][col].bar(centres, s.hist_counts, width=width, color="tab:blue")
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"{s.name}\n({s.activation}, rms {s.rms:.3g})", fontsize=7)
        axes[0][col].set_xlabel("value / rms")
        tk = len(s.token_sparsity_hist)
        axes[1][col].bar([(i + 0.5) / tk * 100 for i in range(tk)], s.token_sparsity_hist, width=100 / tk,
                         color="tab:orange")
        axes[1][col].set_xlabel(f"per-token sparsity, abs<{s.token_sparsity_eps:g} rms (%)")
    axes[0][0].set_ylabel("values")
    axes[1][0].set_ylabel("tokens")
    return save_figure(fig, path)


def plot_dead(result: "ActivationsResult", path: str | Path) -> Path:
    """Dead neurons per activation layer: never above zero, and never outside the smallest eps band."""
    acts = result.profile.activation_sites()
    fig = new_figure(8.0, 4.0)
    ax = fig.add_subplot()
    xs = range(len(acts))
    ax.bar([x - 0.2 for x in xs], [s.dead_neurons for s in acts], width=0.4, label="never > 0")
    ax.bar([x + 0.2 for x in xs], [s.dead_neurons_eps for s in acts], width=0.4,
           label=f"never abs>={min(result.profile.eps):g} rms")
    ax.set_xlabel("activation layer")
    ax.set_ylabel("dead neurons")
    ax.set_title(f"{result.model}: dead neurons per layer (of {acts[0].width if acts else 0})")
    ax.legend()
    return save_figure(fig, path)


def plot_threshold(result: "ActivationsResult", path: str | Path) -> Path:
    """Perplexity against reached sparsity of the threshold sweep."""
    pts = result.threshold.points if result.threshold else ()
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    ax.plot([100 * p.actual for p in pts], [p.ppl for p in pts], marker="o")
    for p in pts:
        ax.annotate(f"{p.ppl:.2f}", (100 * p.actual, p.ppl), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("Linear-input sparsity reached (%)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{result.model}: threshold (TEAL-style) sparsity")
    return save_figure(fig, path)


def write_plots(result: "ActivationsResult", out: Path) -> list[Path]:
    """All plots of the profile job into ``out``."""
    paths = [plot_sparsity(result, out / "sparsity.png"), plot_histograms(result, out / "histograms.png"),
             plot_dead(result, out / "dead.png")]
    if result.threshold is not None:
        paths.append(plot_threshold(result, out / "threshold.png"))
    return paths


def study_table(result: "StudyResult") -> str:
    """One row per activation: mean (± std over seeds) of every measured quantity."""
    rows = [(s.activation, f"{s.val_loss:.4f} ± {s.val_loss_std:.4f}", _pct(s.zero_frac), _pct(s.near_zero_frac),
             _pct(s.dead_frac), f"{s.step_ms:.1f} ± {s.step_ms_std:.1f}") for s in result.summary]
    return markdown_table(["activation", "val loss (nats/char)", "exact zeros", "abs<0.1 rms", "dead neurons",
                           "ms / step"], rows)


def render_study_markdown(result: "StudyResult") -> str:
    """The study report: setup, the summary table, the per-run table."""
    c = result.config
    setup = (f"{c.n_layers} layers, d={c.d_model}, {c.n_heads} heads, MLP 4d; {c.steps} steps of {c.batch} x "
             f"{c.seqlen} characters of {c.text!r} ({result.train_chars:,} train / {result.val_chars:,} validation "
             f"characters, vocabulary {result.vocab}); AdamW lr {c.lr:g} (warm-up + cosine); seeds "
             f"{', '.join(map(str, c.seeds))}; {result.threads} threads. Validation loss and sparsity on "
             f"{c.eval_windows} x {c.seqlen} validation characters.")
    runs = markdown_table(
        ["activation", "seed", "train loss", "val loss", "exact zeros", "dead", "ms / step"],
        [(r.activation, r.seed, f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", _pct(r.zero_frac), _pct(r.dead_frac),
          f"{r.step_ms:.1f}") for r in result.runs])
    return (f"# prunescope activations study\n\n{setup}\n\n![study](study.png)\n\n{study_table(result)}\n\n"
            f"## Runs\n\n{runs}\n")


def plot_study(result: "StudyResult", path: str | Path) -> Path:
    """Four panels: validation loss, activation sparsity, dead neurons, time per step (dots = seeds)
    and a fifth with the training-loss curves."""
    acts = [s.activation for s in result.summary]
    fig = new_figure(14.0, 3.6)
    axes = fig.subplots(1, 5)
    panels = [("val_loss", "validation loss", 1.0), ("zero_frac", "exact zeros (%)", 100.0),
              ("near_zero_frac", "abs<0.1 rms (%)", 100.0), ("step_ms", "ms / training step", 1.0)]
    for ax, (field, label, scale) in zip(axes, panels):
        for i, act in enumerate(acts):
            vals = [scale * getattr(r, field) for r in result.runs if r.activation == act]
            ax.bar(i, sum(vals) / len(vals), color=f"C{i}", alpha=0.6)
            ax.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels(acts)
        ax.set_title(label, fontsize=9)
    lo = min(r.val_loss for r in result.runs)
    hi = max(r.val_loss for r in result.runs)
    axes[0].set_ylim(lo - 0.1 * (hi - lo + 1e-3) - 0.02, hi + 0.1 * (hi - lo + 1e-3) + 0.02)
    for i, act in enumerate(acts):
        for j, r in enumerate(r for r in result.runs if r.activation == act):
            axes[4].plot(r.loss_curve, color=f"C{i}", label=act if j == 0 else None, linewidth=0.8)
    axes[4].set_title("training loss (per 5% of steps)", fontsize=9)
    axes[4].legend(fontsize=7)
    return save_figure(fig, path)
