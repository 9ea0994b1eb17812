"""Where do the gated edit's gates open on a table they were never trained on, and what does the
folded gated model cost on the bundled text?

Trains the gates exactly as ``prunescope edit --method gated`` does with its defaults on the
bundled SmolLM2-135M-Instruct (the people template and its fit rewordings against the fit's
WikiText-2 windows; deterministic), then prints, per edited layer, the share of positions where
the gate is more than half open on tables of another template (default: the products table in
``experiments/templates``) and at its targeted cells; with ``--folded DIR`` (the folder
``prunescope edit --method gated --save`` wrote) also perplexity on the first 8,192 tokens of the
bundled text, unedited against folded. Not part of CI; about a minute on 2 cores::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/gate_tables.py --folded runs/edit-gated/model
"""

from __future__ import annotations

import argparse
import logging

from prunescope import data, evaluate
from prunescope.edit import fields, job, methods
from prunescope.edit.targets import parse_targets
from prunescope.probe.run import load_for_probe
from prunescope.probe.template import load_template

PEOPLE_TARGETS = ("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="experiments/templates/products.yaml")
    parser.add_argument("--fields", default="Category=uniform,Price.digit1=uniform",
                        help="the other template's fields whose cells are read (comma-separated targets)")
    parser.add_argument("--tables", type=int, default=16)
    parser.add_argument("--eval-text", default="../shared/data/wikitext-2/test.txt")
    parser.add_argument("--folded", default=None, help="a folder written by prunescope edit --method gated --save")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = job.EditConfig(targets=PEOPLE_TARGETS, eval_text=args.eval_text)
    template, targets, heldout, fitted_on = job.check_inputs(config)
    model, tokenizer = load_for_probe(config.model, config)
    layers = job.default_layers(len(model.model.layers))
    blocks, fit_windows, unrelated = job._windows(tokenizer, config)
    setting = job._Setting(template, heldout, fitted_on, targets, blocks, fit_windows, unrelated)
    contexts = job.record_fit_contexts(model, tokenizer, config, setting, 0)
    gates = methods.gate_probe(model, contexts, fit_windows, layers)
    other = load_template(args.template)
    other_contexts = fields.record_contexts(model, tokenizer, other, parse_targets(args.fields.split(","), other),
                                            1, args.tables, config.seed, prompt_rows=config.measure_rows)
    table = methods.table_inputs(model, other_contexts, layers)
    cells = methods.table_inputs(model, other_contexts, layers, cells_only=True)
    print(f"| layer | open at {other.name} table positions | open at its cells |\n|---|---:|---:|")
    for i in layers:
        print(f"| {i} | {methods.gate_share(model, i, gates[i], table[i]):.3f} of {len(table[i])} | "
              f"{methods.gate_share(model, i, gates[i], cells[i]):.3f} of {len(cells[i])} |")
    if args.folded:
        for name in (config.model, args.folded):
            m, tok = load_for_probe(name, config)
            text = data.eval_blocks(data.tokenize(tok, data.load_text(data.DEFAULT_TEXT)), 512, 8192)
            print(f"perplexity on the bundled text, {name}: {float(evaluate.perplexity(m, text, progress=False)):.3f}")


if __name__ == "__main__":
    main()
