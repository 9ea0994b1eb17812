"""Where do the gated edit's gates open on tables they were never trained on, and what does the
folded gated model cost on the bundled text?

Trains the gates exactly as ``prunescope edit --method gated`` does with its defaults on the
bundled SmolLM2-135M-Instruct (the people template and its fit rewordings against the fit's
WikiText-2 windows, and the tables of every ``--negative`` template as ``--gate-negative`` does;
deterministic), then prints, per edited layer, the share of positions where the gate is more
than half open on tables of other templates (default: the products and books tables in
``experiments/templates``; measured on seeds other than the negatives') and at their targeted
cells, and on the held-out rewordings of the people table; with ``--folded DIR`` (the folder
``prunescope edit --method gated --save`` wrote, with the same ``--gate-negative`` list as
``--negative`` here) also perplexity on the first 8,192 tokens of the bundled text, unedited
against folded. Not part of CI; a few minutes on 2 cores::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/gate_tables.py --folded runs/edit-gated/model
    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/gate_tables.py \\
        --negative experiments/templates/products.yaml
"""

from __future__ import annotations

import argparse
import logging

from prunescope import data, evaluate
from prunescope.edit import fields, job, methods
from prunescope.probe.run import load_for_probe
from prunescope.probe.template import load_template

PEOPLE_TARGETS = ("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5")
OTHER_TABLES = ("experiments/templates/products.yaml", "experiments/templates/books.yaml")
OTHER_TABLES_SEED = 0  # the other tables' seed (the negatives are recorded on the edit's seeds: job.fit_seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", action="append", default=None,
                        help=f"another table to read the gates on, repeatable (default {', '.join(OTHER_TABLES)})")
    parser.add_argument("--negative", action="append", default=[],
                        help="a template whose tables the gates are trained to stay shut on (--gate-negative)")
    parser.add_argument("--tables", type=int, default=16)
    parser.add_argument("--eval-text", default="../shared/data/wikitext-2/test.txt")
    parser.add_argument("--folded", default=None, help="a folder written by prunescope edit --method gated --save")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = job.EditConfig(targets=PEOPLE_TARGETS, kinds=("gated",), eval_text=args.eval_text,
                            gate_negatives=tuple(args.negative))
    model, tokenizer = load_for_probe(config.model, config)
    layers = job.default_layers(len(model.model.layers))
    setting = job.new_setting(config, tokenizer)
    fit_windows = setting.fit_windows
    contexts = job.record_fit_contexts(model, tokenizer, config, setting, 0)
    gates = methods.gate_probe(model, contexts, fit_windows, layers, job.negative_contexts(model, tokenizer, config,
                                                                                          setting))
    print(f"gates trained against the fit's text{''.join(' and ' + n for n in args.negative)}\n")
    held = [c for _, c in job.heldout_contexts(model, tokenizer, config, setting)]
    read = [("people, held-out rewordings", held)]
    for path in args.template or OTHER_TABLES:
        other = load_template(path)
        read.append((other.name, [fields.record_contexts(model, tokenizer, other, job.table_fields(other),
                                                         config.rows, args.tables,
                                                         OTHER_TABLES_SEED, prompt_rows=config.measure_rows)]))
    print("| table | layer | open at table positions | open at its cells |\n|---|---:|---:|---:|")
    for name, contexts_of in read:
        table = methods.table_inputs(model, contexts_of, layers)
        cells = methods.table_inputs(model, contexts_of, layers, cells_only=True)
        for i in layers:
            print(f"| {name} | {i} | {methods.gate_share(model, i, gates[i], table[i]):.3f} of {len(table[i])} | "
                  f"{methods.gate_share(model, i, gates[i], cells[i]):.3f} of {len(cells[i])} |")
    if args.folded:
        for name in (config.model, args.folded):
            m, tok = load_for_probe(name, config)
            text = data.eval_blocks(data.tokenize(tok, data.load_text(data.DEFAULT_TEXT)), 512, 8192)
            print(f"perplexity on the bundled text, {name}: {float(evaluate.perplexity(m, text, progress=False)):.3f}")


if __name__ == "__main__":
    main()
