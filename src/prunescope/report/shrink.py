"""Render a :class:`~prunescope.pruning.shrink.ShrinkResult` as Markdown and two plots:
``layers.png`` (per-layer output error of each compensation, block influence) and
``summary.png`` (dense against shrunk: parameters, perplexity, prefill time, decode speed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunescope.pruning.shrink import ShrinkResult, UnitErrors
from prunescope.pruning.structured import COMPENSATIONS
from prunescope.report.io import markdown_table
from prunescope.report.plots import new_figure, save_figure


def _ppl(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.3f}"


def _sizes(result: ShrinkResult) -> list[tuple[str, str]]:
    d, s = result.dense_shape, result.shrunk_shape
    rows = [("MLP width", f"{d.intermediate} -> {s.intermediate}")]
    if d.heads is not None:
        rows += [("query heads", f"{d.heads} -> {s.heads}"), ("KV heads", f"{d.kv_heads} -> {s.kv_heads}")]
    rows.append(("decoder layers", f"{result.dense_layers} -> {result.shrunk_layers}"
                 + (f" (dropped {', '.join(map(str, result.dropped_layers))})" if result.dropped_layers else "")))
    return rows


def _latency_rows(result: ShrinkResult) -> list[tuple[str, str]]:
    lat = result.latency
    if lat is None:
        return [("latency", "not measured (offloaded: the models are never in memory whole)"
                 if result.offloaded else "not measured")]
    where = f"{lat.device}, {lat.threads} threads, median of {lat.rounds} interleaved rounds"
    return [
        (f"prefill of {lat.prefill_tokens} tokens (batch 1)",
         f"{1000 * lat.dense_prefill_seconds:.1f} ms -> {1000 * lat.shrunk_prefill_seconds:.1f} ms "
         f"({lat.prefill_speedup:.2f}x faster; {where})"),
        (f"greedy decode of {lat.decode_tokens} tokens (KV cache)",
         f"{lat.dense_decode_tokens_per_second:.1f} -> {lat.shrunk_decode_tokens_per_second:.1f} tokens/s "
         f"({lat.decode_speedup:.2f}x)"),
    ]


def _summary_rows(result: ShrinkResult) -> list[tuple[str, str]]:
    rows = [
        ("model", f"{result.model} ({result.family})"),
        ("criterion / compensation", f"{result.criterion} / {result.compensation}"
         + (f" (damp {result.damp:g})" if result.compensation == "lstsq" else "")),
        *_sizes(result),
        ("rounding", result.rounding),
        ("parameters", f"{result.dense_params:,} -> {result.shrunk_params:,} "
                       f"({result.shrunk_params / result.dense_params:.3f}x)"),
        ("decoder-layer parameters", f"{result.dense_layer_params:,} -> {result.shrunk_layer_params:,} "
                                     f"({result.layer_params_kept:.3f}x)"),
        ("weights in memory", f"{result.dense_weight_bytes / 2**20:.1f} MB -> {result.shrunk_weight_bytes / 2**20:.1f} MB"),
        ("perplexity", f"{_ppl(result.dense_ppl)} -> {_ppl(result.pruned_ppl)}"
         + (f" -> {_ppl(result.recovered_ppl)} after recovery" if result.recovery else "")),
        ("evaluation", f"{result.eval_tokens:,} tokens of {result.eval_text!r} in {result.eval_seqlen}-token windows"),
        *_latency_rows(result),
        ("shrink time", f"{result.prune_seconds:.1f} s"),
    ]
    if result.calib_samples:
        rows.append(("calibration", f"{result.calib_samples} x {result.calib_seqlen} tokens of "
                     f"{result.calib_text!r} (seed {result.seed}), "
                     f"{result.calib_activation_bytes / 2**20:.1f} MB of activations held"))
    if result.recovery:
        r = result.recovery
        rows.append(("recovery", f"{r.mode}{f' r={r.rank}' if r.rank else ''}, {r.steps} steps x "
                     f"{r.batch_size} x {r.seqlen} tokens, lr {r.lr:g}: KL {r.losses[0]:.4f} -> "
                     f"{r.losses[-1]:.4f} in {r.seconds:.1f} s"))
    if result.offloaded:
        rows.append(("offloaded", "yes: weights on disk, one decoder layer in memory at a time"))
    if result.peak_rss_bytes:
        rows.append(("peak resident memory of the process", f"{result.peak_rss_bytes / 2**20:,.0f} MiB"))
    if result.saved:
        rows.append(("saved", f"{result.saved['path']} ({result.saved['safetensors_bytes'] / 2**20:.1f} MB "
                     "of safetensors; loads with AutoModelForCausalLM.from_pretrained)"))
    return rows


def _errors(e: UnitErrors | None) -> str:
    return "" if e is None else " / ".join(f"{getattr(e, c):.4f}" for c in COMPENSATIONS)


def layer_table(result: ShrinkResult) -> str:
    """Per dense layer: new index, block influence, output errors (none / bias / lstsq)."""
    rows = [
        (o.index, "dropped" if o.new_index is None else o.new_index,
         "" if o.block_influence is None else f"{o.block_influence:.4f}",
         _errors(o.attn_error), _errors(o.mlp_error))
        for o in result.layers
    ]
    return markdown_table(
        ["layer", "new index", "block influence", "o_proj error (none / bias / lstsq)",
         "down_proj error (none / bias / lstsq)"], rows,
    )


def _changes_table(result: ShrinkResult) -> str:
    rows = [(k, _short(old), _short(new)) for k, (old, new) in result.config_changes.items()]
    return markdown_table(["config key", "dense", "shrunk"], rows)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_markdown(result: ShrinkResult) -> str:
    """The human-readable report, rendered from the result alone."""
    text = f"# prunescope shrink: {result.model}\n\n"
    text += markdown_table(["", "value"], _summary_rows(result)) + "\n\n"
    text += "![dense against shrunk](summary.png)\n\n"
    text += "## Config changes\n\n" + _changes_table(result) + "\n\n"
    text += (
        "## Per layer\n\nRelative squared error of each pruned writer's outputs on the calibration "
        "tokens, for each compensation (the chosen one was applied; the others show what it is "
        "worth).\n\n![per-layer errors](layers.png)\n\n" + layer_table(result) + "\n"
    )
    return text


def plot_layers(result: ShrinkResult, path: str | Path) -> Path:
    """Per-layer output error of every compensation (log scale) and block influence."""
    with_bi = any(o.block_influence is not None for o in result.layers)
    fig = new_figure(width=9.0, height=6.5 if with_bi else 4.0)
    axes = fig.subplots(2 if with_bi else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    styles = {"none": ":", "bias": "--", "lstsq": "-"}
    for part, color in (("mlp_error", "tab:blue"), ("attn_error", "tab:orange")):
        pts = [(o.index, getattr(o, part)) for o in result.layers if getattr(o, part) is not None]
        if not pts:
            continue
        for comp in COMPENSATIONS:
            ax.plot([i for i, _ in pts], [getattr(e, comp) for _, e in pts], styles[comp], color=color,
                    marker="o", markersize=3, label=f"{'down_proj' if part == 'mlp_error' else 'o_proj'}, {comp}")
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("layer (dense index)")
    ax.set_ylabel("relative output error")
    ax.set_title(f"{result.model}: output error of the pruned writers ({result.criterion})")
    if with_bi:
        ax = axes[1]
        dropped = set(result.dropped_layers)
        ax.bar([o.index for o in result.layers], [o.block_influence or 0.0 for o in result.layers],
               color=["tab:red" if o.index in dropped else "tab:gray" for o in result.layers])
        ax.set_xlabel("layer (red: dropped)")
        ax.set_ylabel("block influence 1 - cos")
    return save_figure(fig, path)


def plot_summary(result: ShrinkResult) -> Any:
    """Figure with dense against shrunk bars (returned unsaved; see :func:`save_summary`)."""
    panels = [("parameters (M)", result.dense_params / 1e6, result.shrunk_params / 1e6)]
    if result.dense_ppl is not None and result.pruned_ppl is not None:
        panels.append(("perplexity", result.dense_ppl, result.recovered_ppl or result.pruned_ppl))
    if result.latency:
        lat = result.latency
        panels += [
            (f"prefill {lat.prefill_tokens} tokens (ms)", 1000 * lat.dense_prefill_seconds, 1000 * lat.shrunk_prefill_seconds),
            ("decode (tokens/s)", lat.dense_decode_tokens_per_second, lat.shrunk_decode_tokens_per_second),
        ]
    fig = new_figure(width=2.6 * len(panels) + 1, height=3.4)
    for ax, (title, dense, shrunk) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.bar(["dense", "shrunk"], [dense, shrunk], color=["tab:gray", "tab:green"])
        ax.set_title(title, fontsize=9)
        for x, v in enumerate((dense, shrunk)):
            ax.annotate(f"{v:.4g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{result.model}: shrunk with {result.criterion} / {result.compensation}", fontsize=10)
    return fig


def save_summary(result: ShrinkResult, path: str | Path) -> Path:
    """Write ``summary.png``."""
    return save_figure(plot_summary(result), path)
