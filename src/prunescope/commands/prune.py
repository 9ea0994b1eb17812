"""``prunescope prune``: prune a model and report perplexity and per-layer sparsity."""

from __future__ import annotations

import argparse
import logging

from prunescope import cli

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prune`` subcommand."""
    parser = subparsers.add_parser(
        "prune",
        help="prune a model's Linear weights and measure perplexity before and after",
        description="Prune the Linear weights of a causal LM (embeddings and lm_head stay dense), "
        "evaluate perplexity before and after, and write report.json, report.md and "
        "sparsity.png. With no arguments: global L1 magnitude pruning of the bundled "
        "SmolLM2-135M-Instruct to 50%, evaluated on Python's bundled pydoc text.",
    )
    cli.add_model_argument(parser)
    parser.add_argument("--method", default="magnitude", help="pruning method (default: magnitude)")
    parser.add_argument(
        "--sparsity", type=float, default=0.5, help="fraction of weights to zero, in (0, 1) (default 0.5)"
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
        "--eval-text", default="default",
        help="evaluation text: 'default' (pydoc_data), a text file, or hf:NAME[:CONFIG][:SPLIT]",
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=16384,
        help="evaluate on the first N tokens of the text (default 16384; 0 = all)",
    )
    parser.add_argument("--eval-seqlen", type=int, default=512, help="window length for perplexity (default 512)")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the options, run the prune job, and write the report files."""
    from prunescope.pipeline import PruneConfig, run_prune
    from prunescope.report import write_json, write_text
    from prunescope.report.prune import layer_table, plot_layer_sparsity, render_markdown

    config = PruneConfig(
        model=args.model,
        method=args.method,
        sparsity=args.sparsity,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        eval_text=args.eval_text,
        eval_tokens=args.eval_tokens or None,
        eval_seqlen=args.eval_seqlen,
        evaluate=not args.no_eval,
        seed=args.seed,
    )
    out = cli.prepare_output_dir(args.out, "prune", args.overwrite)
    result, _model = run_prune(config)
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    plot_layer_sparsity(result, out / "sparsity.png")
    log.info("per-layer sparsity:\n%s", layer_table(result))
    log.info(
        "%s: sparsity %.2f%%, perplexity %s -> %s; report in %s",
        result.model, 100 * result.sparsity_actual,
        f"{result.dense_ppl:.3f}" if result.dense_ppl else "n/a",
        f"{result.pruned_ppl:.3f}" if result.pruned_ppl else "n/a", out,
    )
    return 0
