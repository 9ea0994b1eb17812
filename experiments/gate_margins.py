"""How far from its threshold is each gate of the gated edit, on held-out wordings and on text?

Trains the gates exactly as the README's gated run does (``prunescope edit --method gated
--hold Age.digit2 --hold Age.digit3 --layers 9-13 --fit-tables 48`` with WikiText-2 windows,
seed 0; deterministic), reads ``u = w . x + b`` (the gate's input: shut below 0, fully open
above its span of 8, more than half open above about 4) on the fit's tables and cells, on
``--tables`` tables of each held-out rewording (their targeted cells, per rewording) and on the
fit's and the perplexity text's windows, and prints per layer its quantiles and the share more
than half / fully open if every gate's bias were raised by 0, 2, 4 or 6: whether a gate that
opened more readily would reach the held-out cells before the text. Not part of CI; minutes
on 2 cores (it records the fit's 48 tables and the text again)::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/gate_margins.py
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from prunescope import cli, models
from prunescope.commands import edit as edit_command
from prunescope.edit import job, methods
from prunescope.edit.hooks import Gate

EDIT_ARGS = ("edit", "--target", "Age.digit1=uniform:2-6", "--target", "Gender=Male:0.5,Female:0.5",
             "--method", "gated", "--hold", "Age.digit2", "--hold", "Age.digit3",
             "--eval-text", "../shared/data/wikitext-2/test.txt", "--fit-tables", "48")
LAYERS = (9, 10, 11, 12, 13)
OFFSETS = (0, 2, 4, 6)
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5)


def gate_inputs(tables: int) -> tuple[dict[int, Gate], dict[str, dict[int, torch.Tensor]]]:
    """The gated fit's gates and, per named set of positions, the MLP inputs they read per layer."""
    job.GATE_HELDOUT_TABLES = tables
    config = dataclasses.replace(edit_command._config(cli.build_parser().parse_args(list(EDIT_ARGS))), layers=LAYERS)
    model, tokenizer = models.load(config.model, dtype="float32", device="cpu")
    setting = job.new_setting(config, tokenizer)
    contexts = job.record_fit_contexts(model, tokenizer, config, setting, 0)
    setting.heldout_contexts = job.heldout_contexts(model, tokenizer, config, setting)
    samples = job.gate_samples(model, setting, contexts, LAYERS)
    gates = methods.train_gates(model, samples["fit tables"], [x for n, x in samples.items() if n != "fit tables"])
    held = [c for _, c in setting.heldout_contexts]
    inputs = {"fit tables": samples["fit tables"],
              "fit cells": methods.table_inputs(model, contexts, LAYERS, cells_only=True),
              "held-out tables": methods.table_inputs(model, held, LAYERS),
              "held-out cells": methods.table_inputs(model, held, LAYERS, cells_only=True),
              **{f"  cells of {t.name}": methods.table_inputs(model, [c], LAYERS, cells_only=True)
                 for t, c in setting.heldout_contexts},
              "fit text": samples["fit text"],
              "perplexity text": methods.text_inputs(model, setting.eval_blocks, LAYERS)}
    return gates, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=16, help="tables per held-out rewording (default 16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    gates, inputs = gate_inputs(args.tables)
    q = torch.tensor(QUANTILES)
    print(f"u quantiles at {list(QUANTILES)}; share open > 0.5 / fully open with the bias raised by {OFFSETS}")
    for i, gate in gates.items():
        print(f"layer {i}")
        for name, x in inputs.items():
            u = x[i] @ gate.weight + gate.bias  # [positions]
            shares = "  ".join(f"+{o}: {float((u + o > 4).float().mean()):.3f}/{float((u + o > 8).float().mean()):.3f}"
                               for o in OFFSETS)
            print(f"  {name:<34} n={len(u):5d} u {[round(v, 1) for v in u.quantile(q).tolist()]} "
                  f"max {float(u.max()):.1f}   {shares}")


if __name__ == "__main__":
    main()
