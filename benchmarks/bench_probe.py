"""Exact mode against counting samples: standard error of the row-1 leading-digit distribution of
the Age column (the tens digit of a two-digit age) at equal forward-pass budget, and throughput.

Each estimator is repeated with different seeds; its standard error is the standard deviation of
its estimate across repeats (per digit, then the root-mean-square over digits). The budget is the
number of token positions run through the model (pads and the exact mode's extra choice-scoring
passes included): the default exact mode writes ``--tables`` tables, the other estimators as many
as a pilot run says the same budget buys, and every SE is then rescaled to exactly that budget
(SE x sqrt(tokens spent / budget), as SE falls with 1/sqrt(tables)). Estimators: exact (averaged
exact conditionals) with every column read exactly (the default) or only the Age column
(``--exact-columns Age``: no forwards spent scoring the Gender options), and counting; with
independent draws (iid) or rqmc draws (systematic sampling within groups of tables that share a
history, see prunescope.probe.sampling). For the exact estimators the SE that the report's band assumes
(independent tables) is printed beside the measured one.

Run (inside the heavy-job lock, ~15 minutes on 2 cores):
    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_probe.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from prunescope import models
from prunescope.probe import load_template
from prunescope.probe.run import _fields_of_cell
from prunescope.probe.tables import build_prompt, build_vocab, write_tables

DEFAULT = "exact, all columns, rqmc (default)"
COUNTS = "sampled counts, iid"
ESTIMATORS = {  # name: (exact, draws, exact_columns)
    DEFAULT: (True, "rqmc", None),
    "exact, all columns, iid": (True, "iid", None),
    "exact, Age column only, rqmc": (True, "rqmc", ("Age",)),
    "exact, Age column only, iid": (True, "iid", ("Age",)),
    COUNTS: (False, "iid", None),
    "sampled counts, rqmc": (False, "rqmc", None),
}


def estimate(model, tokenizer, template, n: int, seed: int, spec: tuple, digit_ids) -> dict:
    """Row-1 'Age digit 1' distribution from ``n`` one-row tables, with its cost and reported band."""
    exact, draws, columns = spec
    t0 = time.perf_counter()
    tables = write_tables(model, tokenizer, template, 1, n, seed, exact=exact, batch_size=n, progress=False,
                          draws=draws, exact_columns=columns)
    seconds = time.perf_counter() - t0
    age = next(i for i, c in enumerate(template.columns) if c.type == "digits")
    f = _fields_of_cell(1, template.columns[age], tables.cells[0][age], digit_ids, {})[0]
    band = None
    if exact:  # the band's SE of the marginal, renormalised like the estimate
        band = (np.array(f.exact_high) - np.array(f.exact_low)) / (2 * 1.96) / sum(f.exact_marginal)
    return {"dist": np.array(f.distribution), "tokens": tables.forward_tokens, "seconds": seconds, "band": band}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=32, help="tables per exact-mode estimate")
    parser.add_argument("--repeats", type=int, default=30, help="seeds per estimator")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = models.load("smollm2-135m")
    template = load_template("people")
    digit_ids = build_vocab(tokenizer, template, build_prompt(tokenizer, template, 1)).digits

    pilot = {k: estimate(model, tokenizer, template, args.tables, 10_000, spec, digit_ids)["tokens"]
             for k, spec in ESTIMATORS.items()}
    budget = pilot[DEFAULT]
    sizes = {k: max(1, round(args.tables * budget / pilot[k])) for k in ESTIMATORS}
    results = {k: [estimate(model, tokenizer, template, sizes[k], seed, spec, digit_ids) for seed in range(args.repeats)]
               for k, spec in ESTIMATORS.items()}

    print(f"row-1 'Age digit 1' of SmolLM2-135M-Instruct, {args.repeats} seeds each, torch threads 2, "
          f"budget {budget:,} forward tokens\n")
    print("| estimator | tables per estimate | forward tokens per estimate | SE at the budget (RMS over digits) "
          "| max SE (a digit) | SE the band assumes | seconds per estimate | 1-row tables/min |")
    print("|---|---|---|---|---|---|---|---|")
    se = {}
    for name, res in results.items():
        est = np.stack([r["dist"] for r in res])  # (repeats, 10)
        tokens = float(np.mean([r["tokens"] for r in res]))
        scale = np.sqrt(tokens / budget)  # rescale the SE to exactly the default's budget
        sd = est.std(axis=0, ddof=1) * scale
        se[name] = float(np.sqrt((sd**2).mean()))
        bands = [r["band"] * scale for r in res if r["band"] is not None]
        assumed = f"{float(np.sqrt(np.mean(np.stack(bands) ** 2))):.4f}" if bands else "-"
        secs = np.mean([r["seconds"] for r in res])
        n = sizes[name]
        print(f"| {name} | {n} | {tokens:,.0f} | {se[name]:.4f} | {sd.max():.4f} | {assumed} | {secs:.1f} | {60 * n / secs:.0f} |")
    print()
    for name in ESTIMATORS:
        if not name.startswith("sampled"):
            print(f"SE ratio ({COUNTS} / {name}) at equal forward budget: {se[COUNTS] / se[name]:.2f}x")
    print(f"SE ratio (sampled counts, rqmc / {DEFAULT}): {se['sampled counts, rqmc'] / se[DEFAULT]:.2f}x")
    # An SD from R repeats is uncertain by about 1/sqrt(2 (R - 1)) relatively; a ratio of two by sqrt(2) that.
    print(f"relative uncertainty of each ratio from {args.repeats} repeats: about +-{100 * np.sqrt(1 / (args.repeats - 1)):.0f}%")
    mean_exact = np.stack([r["dist"] for r in results[DEFAULT]]).mean(0)
    print("mean exact distribution of the digit 0-9 (%):", " ".join(f"{100 * p:.1f}" for p in mean_exact))

if __name__ == "__main__":
    main()
