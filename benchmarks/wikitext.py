"""The WikiText-2 protocol shared by the LLM benchmarks (run as ``python benchmarks/<script>.py``,
so this folder is on ``sys.path``): random calibration windows from valid.txt, consecutive
evaluation windows from the start of test.txt."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from prunescope import data

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, as on the command line (``auto``: the accelerator, the checkpoint's dtype)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def windows(
    tokenizer: Any, folder: Path, calib_samples: int, calib_seqlen: int, eval_tokens: int, eval_seqlen: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ``[calib_samples, calib_seqlen]``, evaluation ``[n, eval_seqlen]``) token windows."""
    valid = data.tokenize(tokenizer, (folder / "valid.txt").read_text())
    test = data.tokenize(tokenizer, (folder / "test.txt").read_text())
    return (data.calibration_blocks(valid, calib_samples, calib_seqlen, seed),
            data.eval_blocks(test, eval_seqlen, eval_tokens))
