"""``prunescope lora``: spectra of LoRA adapters (``spectrum``) and re-compression (``compress``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunescope import cli
from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lora spectrum`` and ``lora compress``."""
    parser = subparsers.add_parser(
        "lora",
        help="LoRA adapters: singular-value spectra, effective ranks, rank advice, re-compression",
        description="Analyse PEFT LoRA adapters without the base model.",
    )
    sub = parser.add_subparsers(dest="lora_command", metavar="SUBCOMMAND")
    spectrum = sub.add_parser(
        "spectrum",
        help="singular values, effective/stable/energy ranks per module, per type and per layer",
        description="Read one or more PEFT LoRA adapters (folders with adapter_config.json, or a "
        "folder of such folders) and write report.json, report.md, spectra.png and "
        "effective_rank.png. A bad adapter is reported; the others are still analysed.",
    )
    spectrum.add_argument("adapters", nargs="+", type=Path, metavar="ADAPTER",
                          help="adapter folder(s), or a folder holding adapter folders")
    cli.add_output_arguments(spectrum)
    spectrum.set_defaults(func=run_spectrum)
    compress = sub.add_parser(
        "compress",
        help="truncate every module to the rank keeping --energy of its sigma^2; write a PEFT adapter",
        description="Re-compress a LoRA adapter: per module, the smallest rank keeping --energy of "
        "sum(sigma^2) (clipped to [--min-rank, --max-rank]); writes OUT/adapter (a PEFT adapter with "
        "rank_pattern/alpha_pattern, same scale per module), report.json and report.md.",
    )
    compress.add_argument("adapter", type=Path, metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    compress.add_argument("--energy", type=float, default=0.95, help="share of sum(sigma^2) to keep, in (0, 1] (default 0.95)")
    compress.add_argument("--max-rank", type=int, default=None, help="upper bound on every new rank")
    compress.add_argument("--min-rank", type=int, default=1, help="lower bound on every new rank (default 1)")
    cli.add_output_arguments(compress)
    compress.set_defaults(func=run_compress)
    parser.set_defaults(func=lambda args: _missing(parser))


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_spectrum(args: argparse.Namespace) -> int:
    """Analyse the adapters and write the report; exit 1 if some adapters failed."""
    from prunescope.lora.analysis import analyse_paths
    from prunescope.report import write_json, write_text
    from prunescope.report.lora import plot_effective_rank_heatmap, plot_spectra, render_spectrum_markdown

    out = cli.prepare_output_dir(args.out, "lora-spectrum", args.overwrite)
    report = analyse_paths(args.adapters)
    write_json(report, out / "report.json")
    write_text(render_spectrum_markdown(report), out / "report.md")
    plot_spectra(report, out / "spectra.png")
    plot_effective_rank_heatmap(report, out / "effective_rank.png")
    for c in report.comparisons:
        log.info("%s: %s", c.adapter, c.sentence)
    log.info("%d adapter(s), %d modules analysed in %.2f s; report in %s",
             len(report.adapters), len(report.modules), report.seconds, out)
    for failure in report.failures:
        log.error("not analysed: %s", failure.error)
    return 1 if report.failures else 0


def run_compress(args: argparse.Namespace) -> int:
    """Validate, re-compress, and write OUT/adapter plus the report."""
    from prunescope.lora.compress import CompressConfig, compress_adapter
    from prunescope.lora.io import load_adapter
    from prunescope.report import write_json, write_text
    from prunescope.report.lora import render_compress_markdown

    config = CompressConfig(energy=args.energy, max_rank=args.max_rank, min_rank=args.min_rank)
    adapter = load_adapter(args.adapter)
    out = cli.prepare_output_dir(args.out, "lora-compress", args.overwrite)
    if (out / "adapter").exists() and not args.overwrite:
        raise PrunescopeError(f"{out / 'adapter'} already exists; pass --overwrite")
    result = compress_adapter(adapter, config, out / "adapter")
    write_json(result, out / "report.json")
    write_text(render_compress_markdown(result), out / "report.md")
    log.info("parameters %d -> %d (saving %.1f%%); adapter in %s", result.old_parameters,
             result.new_parameters, 100 * result.parameter_saving, out / "adapter")
    return 0
