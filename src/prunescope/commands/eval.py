"""``prunescope eval``: zero-shot accuracy of a model on lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prunescope import cli

if TYPE_CHECKING:
    from prunescope.zeroshot import ZeroShotConfig

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy on lm-evaluation-harness tasks (needs prunescope[eval])",
        description="Score a causal LM on multiple-choice tasks of EleutherAI's lm-evaluation-harness "
        "(each choice by its log-likelihood given the question, no examples in the prompt) and write "
        "report.json and report.md with acc and acc_norm per task and their standard errors. Tasks "
        "whose data live on the Hugging Face Hub need the internet; tasks defined in YAML files under "
        "--include-path with local data files work offline.",
    )
    cli.add_model_argument(parser)
    parser.add_argument(
        "--tasks", required=True, metavar="T1,T2",
        help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy, or names defined under --include-path",
    )
    parser.add_argument(
        "--include-path", type=Path, default=None, metavar="DIR",
        help="folder of lm-eval YAML task definitions to add to the built-in ones",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> "ZeroShotConfig":
    from prunescope.zeroshot import ZeroShotConfig

    return ZeroShotConfig(
        model=args.model, tasks=cli.comma_names(args.tasks),
        include_path=args.include_path, limit=args.limit, batch_size=args.batch_size,
        **cli.placement_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """Validate the options and task names, measure, and write report.json and report.md."""
    from prunescope.report import write_json, write_text
    from prunescope.report.zeroshot import render_markdown
    from prunescope.zeroshot import run_zeroshot

    config = _config(args)
    config.check()  # bad options, unknown tasks and unreachable data fail before the output folder exists
    out = cli.prepare_output_dir(args.out, "eval", args.overwrite)
    result = run_zeroshot(config)
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    for task, scores in result.scores.items():
        log.info("%s: acc %.4f +- %.4f", task, scores["acc"], scores.get("acc_stderr", float("nan")))
    log.info("%s: %d task(s) in %.1f s; report in %s", result.model, len(result.scores), result.seconds, out)
    return 0
