"""``prunescope probe``: exact distributions of the values a model writes into "random" tables."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunescope import cli

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``probe`` subcommand."""
    parser = subparsers.add_parser(
        "probe",
        help="measure the value preferences of a model asked for a random table",
        description="Ask the model for a random table (built-in template 'people': Name, Gender, Age) "
        "and measure, per row and field, the exact distribution of the values it writes (read from the "
        "logits, averaged over sampled tables), with entropy, KL/JS to a reference, chi-square, the mass "
        "outside the allowed values, contextual calibration and resampling. Writes report.json, "
        "report.md and plots.",
    )
    cli.add_model_argument(parser)
    cli.add_offload_arguments(parser)
    parser.add_argument("--template", default="people", help="built-in 'people' (default) or a YAML/JSON file")
    parser.add_argument("--rows", type=int, default=10, help="rows per table (default 10)")
    parser.add_argument("--samples", type=int, default=50, help="tables written (default 50: about a minute on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--mode", default="exact", help="exact (default: distributions from the logits) or sample (count only)")
    parser.add_argument(
        "--draws", default=None,
        help="how the tables of a batch draw their tokens: rqmc (tables that share a history draw one "
        "systematic sample with a random start; each table is still an exact model sample; default in "
        "exact mode) or iid (independent; default in sample mode, where Wilson intervals assume it)",
    )
    parser.add_argument(
        "--exact-columns", default=None, metavar="COL1,COL2",
        help="in exact mode, read distributions from the logits only for these columns (default: all); "
        "the others are counted only, which saves the forwards that score choice columns",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the cells (default 1)")
    parser.add_argument("--batch", type=int, default=50, help="tables written at once (default 50)")
    parser.add_argument("--reference", type=Path, default=None, help="JSON/YAML {column: {value: probability}} (default uniform)")
    parser.add_argument("--target", default="uniform", help="'uniform' (resample towards the reference, default) or 'none'")
    parser.add_argument("--no-calibration", action="store_true", help="skip contextual calibration")
    parser.add_argument("--calib-samples", type=int, default=32, help="content-free tables for calibration (default 32)")
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from prunescope.probe import ProbeConfig

    return ProbeConfig(
        model=args.model, template=args.template, rows=args.rows, samples=args.samples, seed=args.seed,
        mode=args.mode, draws=args.draws, temperature=args.temperature,
        exact_columns=None if args.exact_columns is None else tuple(c.strip() for c in args.exact_columns.split(",")), batch_size=args.batch, reference=args.reference,
        target=None if str(args.target).lower() == "none" else args.target,
        calibrate=not args.no_calibration, calib_samples=args.calib_samples, **cli.placement_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """Validate, probe, and write report.json, report.md and the plots."""
    from prunescope.probe import load_template, run_probe
    from prunescope.probe.run import check_exact_columns, load_reference
    from prunescope.report import write_json, write_text
    from prunescope.report.probe import render_markdown, write_plots

    config = _config(args)
    template = load_template(config.template)  # fail before the output folder exists
    check_exact_columns(config.exact_columns, template)
    load_reference(config.reference, template)
    out = cli.prepare_output_dir(args.out, "probe", args.overwrite)
    result = run_probe(config)
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    write_plots(result, out)
    row1 = [f for f in result.fields if f.row == 1]
    for f in row1:
        top = max(range(len(f.values)), key=lambda i: f.distribution[i])
        log.info("row 1 %s: top %s (%.1f%%), entropy %.2f bits", f.label, f.values[top], 100 * f.distribution[top], f.entropy_bits)
    log.info("%d tables x %d rows in %.1f s (%.1f tables/min); report in %s",
             result.samples, result.rows, result.seconds, result.tables_per_minute, out)
    return 0
