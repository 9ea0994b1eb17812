"""Why one held-out wording stays far from the target: the residual stream's norm at the targeted
cells, per template (README, "a vector switched by a gate").

What ``prunescope edit`` writes to report.md ("Residual norm at the targeted cells"),
report.json ``cell_norms`` and cell-norms.png before it fits, without the fit: for the people
template, its fit rewordings and its held-out rewordings, it records tables as the edit does
(the unedited bundled SmolLM2-135M-Instruct, one row, the edit's seeds) and gives, per targeted
cell and layer, the median over the tables of the residual norm entering the layer at the cell
as a multiple of the median norm over the table up to the cell (a massive activation: 3x and
more), with the edit's warning for the layers given. Not part of CI; under a minute on 2 cores::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/massive_cells.py --layers 7-11 --plot cells.png
"""

from __future__ import annotations

import argparse
import logging

from prunescope.edit import job
from prunescope.probe.run import load_for_probe
from prunescope.report.edit import cell_norm_table, plot_cell_norms

PEOPLE_TARGETS = ("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=None, help="the edited layers the table shows (default: the edit's)")
    parser.add_argument("--plot", default=None, help="also draw every layer to this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = job.EditConfig(targets=PEOPLE_TARGETS)
    template, targets, heldout, fitted_on = job.check_inputs(config)
    model, tokenizer = load_for_probe(config.model, config)
    count = len(model.model.layers)
    layers = job.parse_layers(args.layers, count) if args.layers else job.default_layers(count)
    setting = job._Setting(template, heldout, fitted_on, targets, None, None, None)
    contexts = job.record_fit_contexts(model, tokenizer, config, setting, 0)
    setting.heldout_contexts = job.heldout_contexts(model, tokenizer, config, setting)
    norms = job.cell_norm_report(model, setting, contexts, layers)
    print(cell_norm_table(norms))
    if args.plot:
        plot_cell_norms(norms, args.plot)


if __name__ == "__main__":
    main()
