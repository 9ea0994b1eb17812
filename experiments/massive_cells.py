"""Why one held-out wording stays far from the target: the residual stream's norm at the targeted
cells, per template (README, "a vector switched by a gate").

For the people template, its fit rewordings and its held-out rewordings, records tables as
``prunescope edit`` does (the unedited bundled SmolLM2-135M-Instruct, one row, the edit's seeds)
and prints, per template and targeted field, the median over its tables of the residual
stream's norm (the decoder layer's input) at the cell's position (where the field's value is
predicted), as a multiple of the median norm over all positions of the same tables, at the
edit's default layers and two after. A cell at several times the usual norm is a position with
a massive activation: a vector of bounded norm moves it less, and the gate reads its
normalized MLP input as unlike the fitted cells. Not part of CI; under a minute on 2 cores::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/massive_cells.py
"""

from __future__ import annotations

import argparse
import logging

import torch

from prunescope.edit import fields, job
from prunescope.probe.run import load_for_probe

PEOPLE_TARGETS = ("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5")


@torch.no_grad()
def cell_norms(model, contexts: fields.Contexts, layers: list[int]) -> dict[str, list[float]]:
    """Per targeted field: per layer, the median over tables of the cell's residual norm divided
    by the median residual norm over every position of the same tables (prompt left out)."""
    out = {}
    for f in contexts.fields:
        ratios = []
        for suffix in f.suffixes:
            ids = torch.tensor([list(contexts.prompt) + list(suffix)])
            states = model(input_ids=ids, output_hidden_states=True).hidden_states  # per layer [1, S, hidden]
            start = len(contexts.prompt)
            ratios.append([float(states[i][0, -1].norm() / states[i][0, start:].norm(dim=-1).median())
                           for i in layers])
        out[f.key.label] = torch.tensor(ratios).median(0).values.tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = job.EditConfig(targets=PEOPLE_TARGETS)
    template, targets, heldout, fitted_on = job.check_inputs(config)
    model, tokenizer = load_for_probe(config.model, config)
    first = job.default_layers(len(model.model.layers))
    layers = [*first, first[-1] + 1, first[-1] + 2]
    print("| template | field | " + " | ".join(f"layer {i}" for i in layers) + " |")
    print("|---|---|" + "---:|" * len(layers))
    for j, t in enumerate([*fitted_on, *heldout]):
        contexts = fields.record_contexts(model, tokenizer, t, targets, config.rows, args.tables,
                                          job.fit_seed(config.seed, 0, j), prompt_rows=config.measure_rows)
        for label, ratios in cell_norms(model, contexts, layers).items():
            print(f"| {t.name} | {label} | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")


if __name__ == "__main__":
    main()
