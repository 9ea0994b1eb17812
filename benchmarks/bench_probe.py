"""Exact mode against counting samples: standard error of the row-1 leading-digit distribution of
the Age column (the tens digit of a two-digit age) at equal forward-pass budget, and throughput.

Both estimators are repeated with different seeds; the standard error of each is the standard
deviation of its estimate across repeats (per digit, then the root-mean-square over digits).
The budget is the number of token positions run through the model (pads and the exact mode's
extra choice-scoring passes included); sampling mode gets as many more tables as that budget buys.

Run (inside the heavy-job lock, ~2-4 minutes on 2 cores):
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


def estimate(model, tokenizer, template, n: int, seed: int, exact: bool, digit_ids) -> tuple[np.ndarray, int, float]:
    """Row-1 'Age digit 1' distribution from ``n`` one-row tables; (distribution, forward tokens, seconds)."""
    t0 = time.perf_counter()
    tables = write_tables(model, tokenizer, template, 1, n, seed, exact=exact, batch_size=n, progress=False)
    seconds = time.perf_counter() - t0
    age = next(i for i, c in enumerate(template.columns) if c.type == "digits")
    fields = _fields_of_cell(1, template.columns[age], tables.cells[0][age], digit_ids, {})
    return np.array(fields[0].distribution), tables.forward_tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=32, help="tables per exact-mode repeat")
    parser.add_argument("--repeats", type=int, default=8, help="seeds per estimator")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = models.load("smollm2-135m")
    template = load_template("people")
    digit_ids = build_vocab(tokenizer, template, build_prompt(tokenizer, template, 1)).digits

    _, f_exact, _ = estimate(model, tokenizer, template, args.tables, 10_000, True, digit_ids)
    _, f_sample, _ = estimate(model, tokenizer, template, args.tables, 10_000, False, digit_ids)
    n_sample = max(1, round(args.tables * f_exact / f_sample))
    runs = {"exact": (args.tables, True), "sampled counts": (n_sample, False)}
    results: dict[str, list] = {}
    for name, (n, exact) in runs.items():
        results[name] = [estimate(model, tokenizer, template, n, seed, exact, digit_ids) for seed in range(args.repeats)]

    print(f"row-1 'Age digit 1' of SmolLM2-135M-Instruct, {args.repeats} seeds each, torch threads 2\n")
    print("| estimator | tables per estimate | forward tokens per estimate | SE (RMS over digits) | max SE | seconds per estimate | 1-row tables/min |")
    print("|---|---|---|---|---|---|---|")
    se = {}
    for name, res in results.items():
        est = np.stack([r[0] for r in res])  # (repeats, 10)
        sd = est.std(axis=0, ddof=1)
        se[name] = float(np.sqrt((sd**2).mean()))
        tokens = np.mean([r[1] for r in res])
        secs = np.mean([r[2] for r in res])
        n = runs[name][0]
        print(f"| {name} | {n} | {tokens:,.0f} | {se[name]:.4f} | {sd.max():.4f} | {secs:.1f} | {60 * n / secs:.0f} |")
    mean_exact = np.stack([r[0] for r in results["exact"]]).mean(0)
    print(f"\nSE ratio (sampled counts / exact) at equal forward budget: {se['sampled counts'] / se['exact']:.2f}x")
    print("mean exact distribution of the digit 0-9 (%):", " ".join(f"{100 * p:.1f}" for p in mean_exact))


if __name__ == "__main__":
    main()
