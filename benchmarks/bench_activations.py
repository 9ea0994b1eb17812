"""Profiling overhead of ``prunescope.activations``: plain forward vs profiled forward, side by side.

The default job's tokens (8,192 = 4 batches of 4 x 512, as ``prunescope activations`` runs them)
go through the bundled SmolLM2-135M (a) plainly and (b) with the profiler's hooks on every
activation and Linear input, at the default sampling stride (8), at 4 and at 1 (every token in
the histograms), and (c) with TEAL threshold hooks on every decoder Linear. Runs are interleaved
round-robin so machine noise hits all variants alike; the table gives the median seconds, the
ratio to the plain forward of the same round (median over rounds) and the range of that ratio.
Goal: profiling <= 1.3x. A second table gives what sampling costs in accuracy: the largest
difference, over all sites, between the sampled statistics and the every-token ones.

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_activations.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from prunescope import data, models
from prunescope.activations import threshold
from prunescope.activations.profiler import DEFAULT_SAMPLE_EVERY, Profile, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per pass (default 8192, the job's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load()
    tokens = data.tokenize(tok, data.load_text())
    blocks = data.eval_blocks(tokens, args.seqlen, args.tokens)  # [tokens // seqlen, seqlen]
    thresholds = {n: 0.05 for n in threshold.default_targets(model)}

    def forward_all() -> None:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], args.batch):
                model(input_ids=blocks[start : start + args.batch], use_cache=False)

    def thresholded() -> None:
        with threshold.thresholded(model, thresholds):
            forward_all()

    profiles: dict[int, Profile] = {}

    def profiled(k: int) -> Callable[[], None]:
        def run() -> None:
            profiles[k] = profile(model, blocks, sample_every=k, batch_size=args.batch, progress=False)
        return run

    variants = {"plain forward": forward_all}
    for k in (DEFAULT_SAMPLE_EVERY, 4, 1):
        variants[f"profiled (sample_every={k}{', default' if k == DEFAULT_SAMPLE_EVERY else ''})"] = profiled(k)
    variants["TEAL thresholds on all decoder Linears"] = thresholded
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = times["plain forward"]
    print(f"{blocks.numel()} tokens (batches of {args.batch} x {args.seqlen}), {args.threads} threads, "
          f"{args.repeats} interleaved rounds\n")
    print("| variant | median seconds | ratio to plain (median over rounds) | ratio range |\n|---|---|---|---|")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ratios):.2f}x "
              f"| {min(ratios):.2f}-{max(ratios):.2f}x |")
    print("\nWhat sampling costs in accuracy: largest difference to sample_every=1 over all sites\n")
    print("| sample_every | near-zero fraction (any eps) | mean per-token sparsity | firing rate (mean) |\n|---|---|---|---|")
    for k in sorted(profiles, reverse=True):
        if k != 1:
            print(f"| {k} | " + " | ".join(f"{d:.4f}" for d in sampling_error(profiles[k], profiles[1])) + " |")


def sampling_error(sampled: Profile, full: Profile) -> tuple[float, float, float]:
    """Largest absolute difference, over sites, of the sampled statistics to the all-token ones."""
    pairs = list(zip(sampled.sites, full.sites))
    near = max(abs(a.near_zero_frac[e] - b.near_zero_frac[e]) for a, b in pairs for e in a.near_zero_frac)
    token = max(abs(a.token_sparsity_mean - b.token_sparsity_mean) for a, b in pairs)
    firing = max(abs(a.firing_mean - b.firing_mean) for a, b in pairs)
    return near, token, firing


if __name__ == "__main__":
    main()
