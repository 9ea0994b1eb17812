"""Profiling overhead of ``prunescope.activations``: plain forward vs profiled forward, side by side.

The same token batch goes through the bundled SmolLM2-135M (a) plainly and (b) with the
profiler's hooks on every activation and Linear input, at the default sampling stride and at
stride 1 (every token in the histograms), and (c) with TEAL threshold hooks on every decoder
Linear. Runs are interleaved round-robin so machine noise hits all variants alike; the table
gives the median seconds and the ratio to the plain forward. Goal: profiling <= 1.3x.

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_activations.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunescope import data, models
from prunescope.activations import threshold
from prunescope.activations.profiler import profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    tokens = data.tokenize(tok, data.load_text())
    blocks = data.eval_blocks(tokens, args.seqlen, args.batch * args.seqlen)  # [batch, seqlen]
    thresholds = {n: 0.05 for n in threshold.default_targets(model)}

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=blocks, use_cache=False)

    def thresholded() -> None:
        with threshold.thresholded(model, thresholds), torch.no_grad():
            model(input_ids=blocks, use_cache=False)

    variants = {
        "plain forward": plain,
        "profiled (sample_every=4, default)": lambda: profile(model, blocks, batch_size=args.batch, progress=False),
        "profiled (sample_every=8)": lambda: profile(model, blocks, sample_every=8, batch_size=args.batch, progress=False),
        "profiled (sample_every=1)": lambda: profile(model, blocks, sample_every=1, batch_size=args.batch, progress=False),
        "TEAL thresholds on all decoder Linears": thresholded,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain forward"])
    print(f"{blocks.numel()} tokens ({args.batch} x {args.seqlen}), {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds\n")
    print("| variant | seconds | ratio to plain |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
