"""``prunescope activations``: profile activation sparsity (and swap / threshold it), or, with
``study`` in place of the model, train a tiny network with ReLU/GELU/SiLU/Mish and compare."""

from __future__ import annotations

import argparse
import logging

from prunescope import cli
from prunescope.activations.profiler import DEFAULT_EPS, DEFAULT_SAMPLE_EVERY, DEFAULT_TOKEN_EPS

log = logging.getLogger(__name__)

STUDY = "study"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.01,0.1, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in text.split(",") if v.strip())


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    text_help = "'default' (pydoc_data), a text file, or hf:NAME[:CONFIG][:SPLIT]"
    g = parser.add_argument_group("profile (MODEL)")
    g.add_argument("--text", default="default", help=f"text to profile on: {text_help}")
    g.add_argument("--tokens", type=int, default=8192, help="profile the first N tokens (default 8192)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--batch", type=int, default=4, help="windows per forward (default 4)")
    g.add_argument("--eps", type=_floats, default=DEFAULT_EPS, metavar="E1,E2,...",
                   help="near-zero thresholds, fractions of each layer's RMS "
                   f"(default {','.join(f'{e:g}' for e in DEFAULT_EPS)})")
    g.add_argument("--token-eps", type=float, default=DEFAULT_TOKEN_EPS,
                   help=f"eps of the per-token sparsity (default {DEFAULT_TOKEN_EPS:g})")
    g.add_argument("--sample-every", type=int, default=DEFAULT_SAMPLE_EVERY, metavar="K",
                   help="histograms, near-zero fractions, firing rates and per-token sparsity on 1/K of the "
                   f"tokens (a contiguous, rotating run per batch; default {DEFAULT_SAMPLE_EVERY}; 1 = all). "
                   "Exact zeros and dead neurons always use every token")
    g.add_argument("--swap", choices=("relu", "gelu", "silu"), default=None,
                   help="replace every activation (relufication, no fine-tuning); report perplexity and "
                   "sparsity before and after")
    g.add_argument("--threshold", type=_floats, default=(), metavar="S1,S2,...",
                   help="TEAL-style threshold sparsity: zero Linear inputs below a per-layer threshold "
                   "calibrated for each target in [0, 1), e.g. 0,0.25,0.4,0.5,0.65; report perplexity")
    g.add_argument("--threshold-include", action="append", default=[], metavar="GLOB",
                   help="threshold only the decoder Linears matching GLOB (repeatable; default all)")
    g.add_argument("--calib-text", default="default", help=f"threshold calibration text: {text_help}")
    g.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    g.add_argument("--eval-text", default="default", help=f"perplexity text: {text_help}")
    g.add_argument("--eval-tokens", type=int, default=16384, help="perplexity tokens (default 16384)")
    g.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window (default 512)")


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("study (MODEL = 'study')")
    g.add_argument("--acts", type=_names, default=("relu", "gelu", "silu", "mish"),
                   help="activations to compare (default relu,gelu,silu,mish)")
    g.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="initialisation seeds (default 0,1,2)")
    g.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    g.add_argument("--study-batch", type=int, default=32, help="sequences per step (default 32)")
    g.add_argument("--study-seqlen", type=int, default=128, help="characters per sequence (default 128)")
    g.add_argument("--d-model", type=int, default=128, help="width (default 128)")
    g.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    g.add_argument("--study-text", default="default", help="training text (default: the pydoc text)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``activations`` subcommand."""
    parser = subparsers.add_parser(
        "activations",
        help="activation sparsity: profile, swap, threshold (TEAL); or 'activations study'",
        description="Two forms. (1) prunescope activations [MODEL] ...: hook every activation and every "
        "Linear input, stream per-layer statistics (exact zeros, |x| < eps*RMS, histograms, dead neurons, "
        "per-token sparsity, weight x input density of each Linear) and write report.json, report.md and "
        "plots; optionally --swap the activations or sweep --threshold sparsity. (2) prunescope activations "
        "study ...: train a tiny character-level transformer with ReLU/GELU/SiLU/Mish over several seeds "
        "and compare validation loss, sparsity, dead neurons and time per step. (A model folder literally "
        "named 'study' is reached as ./study.)",
    )
    cli.add_model_argument(parser)
    cli.add_offload_arguments(parser)
    _add_profile_arguments(parser)
    _add_study_arguments(parser)
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _profile_config(args: argparse.Namespace):
    from prunescope.activations.job import ActivationsConfig

    return ActivationsConfig(
        model=args.model, text=args.text, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch,
        eps=tuple(args.eps), token_eps=args.token_eps, sample_every=args.sample_every, swap=args.swap,
        thresholds=tuple(args.threshold), threshold_include=tuple(args.threshold_include),
        calib_text=args.calib_text, calib_tokens=args.calib_tokens, eval_text=args.eval_text,
        eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen, **cli.placement_options(args),
    )


def _study_config(args: argparse.Namespace):
    from prunescope.activations.study import StudyConfig

    return StudyConfig(
        text=args.study_text, activations=tuple(args.acts), seeds=tuple(args.seeds), steps=args.steps,
        batch=args.study_batch, seqlen=args.study_seqlen, d_model=args.d_model, n_layers=args.layers, lr=args.lr,
    )


def _run_study(args: argparse.Namespace) -> int:
    from prunescope.activations.study import run_study
    from prunescope.report import write_json, write_text
    from prunescope.report.activations import plot_study, render_study_markdown, study_table

    config = _study_config(args)
    out = cli.prepare_output_dir(args.out, "activations-study", args.overwrite)
    result = run_study(config)
    write_json(result, out / "report.json")
    write_text(render_study_markdown(result), out / "report.md")
    plot_study(result, out / "study.png")
    log.info("activation study:\n%s\nreport in %s", study_table(result), out)
    return 0


def run(args: argparse.Namespace) -> int:
    """Validate, run the profile job (or the study), write the report files."""
    if args.model == STUDY:
        return _run_study(args)
    from prunescope.activations.job import run_activations
    from prunescope.report import write_json, write_text
    from prunescope.report.activations import render_markdown, write_plots

    config = _profile_config(args)
    out = cli.prepare_output_dir(args.out, "activations", args.overwrite)
    result = run_activations(config)
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    write_plots(result, out)
    acts = result.profile.activation_sites()
    log.info("%d activation sites, %d Linear inputs profiled on %d tokens in %.1f s; report in %s",
             len(acts), len(result.profile.sites) - len(acts), result.profile.tokens, result.profile.seconds, out)
    return 0
