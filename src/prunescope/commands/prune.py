"""``prunescope prune``: prune a model and report perplexity and per-layer sparsity."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prunescope import cli
from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from prunescope.pruning.job import PruneConfig

log = logging.getLogger(__name__)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.3,0.5,0.7, got {text!r}") from None


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", default="sparsegpt",
        help="sparsegpt (default: the best model at 50%%, about 100 s on the bundled model on 2 cores), wanda, "
        "ria or magnitude (no calibration; the plain baseline); with --sweep a comma-separated list, "
        "e.g. wanda,sparsegpt",
    )
    parser.add_argument(
        "--sparsity", type=float, default=None,
        help="fraction of weights to zero, in (0, 1) (default 0.5; N/M for an N:M pattern)",
    )
    parser.add_argument(
        "--pattern", default="unstructured",
        help="'unstructured' (default), or N:M such as 2:4 or 4:8 (N of every M inputs zeroed)",
    )
    parser.add_argument(
        "--scope", default=None,
        help="comparison group for unstructured magnitude: global (default), layer or row; "
        "wanda: row (default) or layer; ria: layer (default) or row; sparsegpt: block. "
        "N:M always compares within each group",
    )
    parser.add_argument(
        "--allocation", default="uniform",
        help="how the sparsity is spread over decoder layers: uniform (default: every layer the same) or owl "
        "(Yin et al. 2024: layers with more outlier Wanda scores are pruned less, the mean kept; one extra "
        "calibration pass; unstructured only). Helps most at 60-70%%",
    )
    parser.add_argument(
        "--refine", default="none",
        help="none (default) or dsnot: refine every mask without training (Zhang et al. 2024: swap pruned "
        "and kept weights within each row where that lowers the layer's expected output error); works "
        "after any method and pattern, SparseGPT's refined masks are solved again",
    )
    parser.add_argument(
        "--permute", action="store_true",
        help="N:M with wanda, ria or sparsegpt: before each decoder layer is pruned, reorder its MLP units "
        "(gate/up rows and down_proj columns together, so the model computes exactly the same) by RIA's "
        "channel permutation (Zhang et al. 2024), so that down_proj's N:M groups keep more of its score. "
        "The saved model stays a plain N:M model; the other Linears read the residual stream or heads "
        "and keep their order",
    )
    parser.add_argument(
        "--owl-m", type=float, default=5.0, metavar="M",
        help="OWL: a score is an outlier above M times its layer's mean score (default 5)",
    )
    parser.add_argument(
        "--owl-lambda", type=float, default=0.08, metavar="LAMBDA",
        help="OWL: layers get sparsities within the target +- LAMBDA (default 0.08)",
    )
    parser.add_argument(
        "--include", action="append", default=[], metavar="GLOB",
        help="only prune Linear modules whose name matches GLOB (repeatable), e.g. '*.mlp.*'",
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB",
        help="never prune Linear modules whose name matches GLOB (repeatable)",
    )
    parser.add_argument(
        "--skip-incompatible", action="store_true",
        help="leave layers whose input size is not a multiple of M dense (N:M) instead of failing",
    )
    parser.add_argument(
        "--sweep", type=_floats, default=(), metavar="S1,S2,...",
        help="also prune each method at these sparsities from the dense model and plot perplexity (sweep.png)",
    )


def _add_save_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save", action="store_true",
        help="write the pruned model to OUT/model: a compressed sparse checkpoint, or with --offload a "
        "Hugging Face folder of safetensors shards written one layer at a time",
    )


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", default="", metavar="T1,T2",
        help="also measure zero-shot accuracy on these lm-evaluation-harness tasks before and after pruning "
        "(needs prunescope[eval]; see `prunescope eval`)",
    )
    parser.add_argument(
        "--tasks-include-path", type=Path, default=None, metavar="DIR",
        help="folder of lm-eval YAML task definitions for --tasks",
    )
    parser.add_argument(
        "--tasks-limit", type=int, default=None, metavar="N", help="score only the first N items of each task",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prune`` subcommand."""
    parser = subparsers.add_parser(
        "prune",
        help="prune a model's Linear weights and measure perplexity before and after",
        description="Prune the Linear weights of a causal LM (embeddings and lm_head stay dense) by "
        "SparseGPT, Wanda, RIA or magnitude, unstructured or N:M (OWL allocation, DSnoT refinement), "
        "evaluate perplexity before and after, and write report.json, report.md and sparsity.png. With no arguments: SparseGPT pruning of the "
        "bundled SmolLM2-135M-Instruct to 50%, calibrated and evaluated on Python's bundled pydoc text "
        "(--method magnitude for global L1 magnitude, no calibration).",
    )
    cli.add_model_argument(parser)
    _add_method_arguments(parser)
    cli.add_text_arguments(parser)
    _add_task_arguments(parser)
    _add_save_argument(parser)
    cli.add_offload_arguments(parser, automatic=True)
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace, out: Path | None) -> "PruneConfig":
    """The validated job config from the parsed options (``out`` only places ``--save``)."""
    from prunescope.pruning.job import PruneConfig

    methods = cli.comma_names(args.method)
    if not methods:
        raise PrunescopeError("--method is empty; choose magnitude, wanda, ria or sparsegpt")
    return PruneConfig(
        model=args.model,
        method=methods[0],
        sparsity=args.sparsity,
        pattern=args.pattern,
        scope=args.scope,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        skip_incompatible=args.skip_incompatible,
        allocation=args.allocation,
        refine=args.refine,
        permute=args.permute,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        **cli.text_options(args),
        **cli.placement_options(args),
        sweep=tuple(args.sweep),
        sweep_methods=methods,
        save_dir=(out / "model") if args.save and out is not None else None,
        tasks=cli.comma_names(args.tasks),
        tasks_include_path=args.tasks_include_path,
        tasks_limit=args.tasks_limit,
    )


def run(args: argparse.Namespace) -> int:
    """Validate the options, run the prune job, and write the report files."""
    from prunescope import distributed
    from prunescope.pruning.job import run_prune
    from prunescope.report import write_json, write_text
    from prunescope.report.prune import layer_table, plot_layer_sparsity, plot_sweep, render_markdown

    _config(args, None)  # validate every option before touching the output folder
    out = cli.prepare_output_dir(args.out, "prune", args.overwrite)
    result, _model = run_prune(_config(args, out))
    if not distributed.is_main():
        return 0  # process 0 writes
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    plot_layer_sparsity(result, out / "sparsity.png")
    if result.sweep:
        plot_sweep(result, out / "sweep.png")
    log.info("per-layer sparsity:\n%s", layer_table(result))
    log.info(
        "%s: %s %s sparsity %.2f%%, perplexity %s -> %s, pruned in %.1f s; report in %s",
        result.model, result.method, result.pattern, 100 * result.sparsity_actual,
        f"{result.dense_ppl:.3f}" if result.dense_ppl else "n/a",
        f"{result.pruned_ppl:.3f}" if result.pruned_ppl else "n/a", result.prune_seconds, out,
    )
    log.info("%s", _next_steps(result))
    return 0


def _next_steps(result) -> str:
    """One line on how to go further from this run (what a newcomer would try next)."""
    hints = []
    if result.allocation == "uniform" and result.pattern == "unstructured":
        hints.append("at higher sparsity OWL spreads it by layer (--sparsity 0.7 --allocation owl)")
    if result.refine == "none" and result.method != "sparsegpt":  # measured to hurt after SparseGPT
        hints.append("--refine dsnot refines the masks without training")
    if result.pattern != "unstructured" and result.method in ("wanda", "ria") and not result.permute:
        hints.append("--permute reorders the MLP units so that N:M keeps more")
    hints.append("masks make no model faster: `prunescope shrink` removes channels, heads and layers for real")
    if result.method != "magnitude":
        hints.append("the plain baseline is --method magnitude")
    return "next: " + "; ".join(hints)
