"""The ``prunescope`` command line: thin subcommands that parse, validate, call the library, render.

Each subcommand lives in ``prunescope.commands.<name>`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a ``run(args) -> int`` callable. Subcommand modules
import heavy libraries (torch, transformers) inside ``run`` so ``--help`` stays fast.

Errors: a :class:`~prunescope.errors.PrunescopeError` (bad input) or an ``OSError`` (a full disk,
a folder that cannot be written) becomes one line on stderr and exit code 2 (``--debug`` adds
the traceback); anything else is a bug in prunescope: its traceback, a request to report it,
and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from prunescope import __version__
from prunescope.errors import PrunescopeError, joined_lines

log = logging.getLogger("prunescope")

# One module per subcommand; each has register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "prunescope.commands.prune",
    "prunescope.commands.shrink",
    "prunescope.commands.lora",
    "prunescope.commands.probe",
    "prunescope.commands.activations",
    "prunescope.commands.eval",
    "prunescope.commands.edit",
)


def comma_names(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: a comma-separated option's names, blanks dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The optional positional MODEL, with ``--device`` and ``--dtype``, shared by commands that
    load a model."""
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        metavar="MODEL",
        help="'smollm2-135m' (the bundled SmolLM2-135M-Instruct, default), a local folder "
        "written by save_pretrained or by 'prunescope prune --save', or a Hugging Face model id",
    )
    parser.add_argument(
        "--device", default="auto", type=_computing_device,
        help="where the model runs: auto (default: CUDA, then MPS, else the CPU), cpu, cuda, cuda:N or mps",
    )
    parser.add_argument(
        "--dtype", default="auto",
        help="parameter dtype: auto (default: the checkpoint's own, float32 if it names none or is "
        "float16 on the CPU), float32, bfloat16 or float16; statistics and perplexity are "
        "accumulated in float32/float64 whatever this is",
    )


def add_offload_arguments(parser: argparse.ArgumentParser, automatic: bool = False) -> None:
    """``--offload`` and ``--offload-folder`` (commands that can keep the weights on disk)."""
    parser.add_argument(
        "--offload", action=argparse.BooleanOptionalAction, default=None,
        help="keep the weights on disk and bring them to the device only while used, for models "
        "larger than memory"
        + (" (one decoder layer at a time, needs a safetensors checkpoint; default: only "
           "when the model does not fit the device's free memory; --no-offload: never)" if automatic
           else " (accelerate's disk dispatch: each module's weights during its forward; slower)"),
    )
    parser.add_argument(
        "--offload-folder", type=Path, default=None, metavar="DIR",
        help="scratch folder for offloaded weights (default: the system's temporary folder)",
    )


def placement_options(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`~prunescope.models.Placement` keywords from options added by
    :func:`add_model_argument` (and :func:`add_offload_arguments` where the command has them)."""
    return dict(device=args.device, dtype=args.dtype, offload=getattr(args, "offload", None),
                offload_folder=getattr(args, "offload_folder", None))


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out`` and ``--overwrite``, shared by every command that writes a report."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder for report.json, report.md and plots (default: runs/<command>-<timestamp>)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it already exists"
    )


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """Calibration and evaluation options shared by ``prune`` and ``shrink`` (same names, defaults)."""
    text_help = "'default' (pydoc_data), a text file, or hf:NAME[:CONFIG][:SPLIT]"
    parser.add_argument("--calib-text", default="default", help=f"calibration text: {text_help}")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--calib-batch", type=int, default=8, help="calibration windows per forward (default 8)")
    parser.add_argument("--eval-text", default="default", help=f"evaluation text: {text_help}")
    parser.add_argument(
        "--eval-tokens", type=int, default=16384,
        help="evaluate on the first N tokens of the text (default 16384; 0 = all)",
    )
    parser.add_argument("--eval-seqlen", type=int, default=512, help="window length for perplexity (default 512)")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")


def text_options(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`~prunescope.data.TextOptions` keywords from options added by :func:`add_text_arguments`."""
    return dict(
        calib_text=args.calib_text, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        calib_batch_size=args.calib_batch, eval_text=args.eval_text, eval_tokens=args.eval_tokens or None,
        eval_seqlen=args.eval_seqlen, evaluate=not args.no_eval, seed=args.seed,
    )


def check_output_dir(out: Path | None, command: str, overwrite: bool) -> Path:
    """The output folder to use, checked but not created: refuses an existing non-empty folder
    unless ``overwrite``, a file in its place, and a place that cannot be written. Only the main
    process checks (the others write nothing)."""
    from prunescope import atomic, distributed

    if out is None:
        out = Path("runs") / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if not distributed.is_main():
        return out
    if out.exists() and not out.is_dir():
        raise PrunescopeError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrunescopeError(
            f"output folder {out} already exists and is not empty; pass --overwrite or another --out"
        )
    existing = atomic.unwritable_place(out)
    if existing is not None:
        raise PrunescopeError(f"--out {out} cannot be created: {existing} is not a writable folder")
    return out


def prepare_output_dir(out: Path | None, command: str, overwrite: bool) -> Path:
    """Check the output folder (:func:`check_output_dir`) before any work; it is created by the
    first file written into it (every writer creates its folder), so a run that fails on its
    input, or before it has a result, leaves no folder behind."""
    return check_output_dir(out, command, overwrite)


def _computing_device(spec: str) -> str:
    """``--device``: refuse ``meta`` (shapes only, no data: useful from Python for planning, but a
    command computes); other names are resolved, and checked, by the job."""
    if spec.strip().lower().startswith("meta"):
        raise argparse.ArgumentTypeError(
            f"{spec!r} holds shapes but no data and cannot compute; choose one of auto, cpu, cuda, cuda:N, mps"
        )
    return spec


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="prunescope",
        description="Prune PyTorch / Hugging Face models and look inside them.",
    )
    parser.add_argument("--version", action="version", version=f"prunescope {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, not only of bugs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _join_processes(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group (prune, shrink) or refuse in one line (the rest)."""
    from prunescope import distributed

    if not distributed.launched():
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        distributed.refuse(f"prunescope {args.command}")
    from prunescope import devices

    distributed.init_from_env(devices.resolve_device(args.device))
    options = " ".join(f"{k}={v!r}" for k, v in sorted(vars(args).items()) if k != "func")
    distributed.agree("the command line", options)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # transformers/datasets are chatty at INFO and draw a bar per weight load
        for name in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # lm-eval warns on every run about how prunescope hands it the model (already loaded, zero-shot)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# commands whose calibration and evaluation split across processes (torchrun)
DISTRIBUTED_COMMANDS = ("prune", "shrink")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunescope`` console script; returns the exit code."""
    if os.environ.get("RANK", "0") != "0":  # launched in several processes: one set of progress bars
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet or os.environ.get("RANK", "0") != "0")
    out = getattr(args, "out", None)
    out_existed = out is not None and out.exists()
    try:
        _join_processes(args)
        return int(args.func(args) or 0)
    except (PrunescopeError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        _remove_if_new_and_empty(out, out_existed)
        print(f"prunescope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove_if_new_and_empty(out, out_existed)
        print(f"prunescope {args.command}: interrupted; files being written were removed, "
              "finished ones kept", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"prunescope {args.command}: internal error: this is a bug in prunescope; please report it "
            "with the traceback above and the command you ran",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    """The message of an expected failure on one line: a PrunescopeError's text, or what the OS
    said and about which file."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return joined_lines(exc)


def _remove_if_new_and_empty(out: Path | None, existed: bool) -> None:
    """After a failed run: remove ``--out`` if this run created it and nothing finished in it."""
    if out is None or existed or not out.is_dir():
        return
    try:
        out.rmdir()  # only succeeds when empty
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
