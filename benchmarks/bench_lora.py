"""Spectra of LoRA updates: the fast path (prunescope.lora.batched_singular_values: batched Gram/Cholesky with a QR + r x r core fallback) against a dense SVD of the formed ΔW.

Two adapters with random factors, timed side by side in one run:

1. SmolLM2-135M's shape: 30 layers x q, k, v, o (576/192 x 576), gate, up (1536 x 576),
   down (576 x 1536), r = 64 (210 modules);
2. one 4096 x 4096 module, r = 16.

The dense baselines form ΔW and call ``torch.linalg.svdvals`` in float32 and float64 (the fast
path computes in float64). Each time is the best of ``--repeats`` runs. The table also gives the
largest relative error of the fast singular values against dense float64 (values above 1e-6 of
the largest). Run under the shared lock::

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_lora.py
"""

from __future__ import annotations

import argparse

import torch

from prunescope.lora.spectrum import batched_singular_values
from prunescope.report import markdown_table
from timing import best_time

SMOLLM2 = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
           "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def factors(shapes: list[tuple[int, int]], r: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random float32 ``(B [out, r], A [r, in])`` pairs."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(o, r, generator=gen) * 0.01, torch.randn(r, i, generator=gen) / i**0.5) for o, i in shapes]


def fast(pairs, scale: float) -> list[torch.Tensor]:
    return batched_singular_values([(B, A, scale) for B, A in pairs])


def dense(pairs, scale: float, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(scale * (B.to(dtype) @ A.to(dtype))) for B, A in pairs]


def max_rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, d in zip(got, ref):
        d = d[: g.numel()].double()
        keep = d > 1e-6 * d[0]
        worst = max(worst, float(((g[keep] - d[keep]).abs() / d[keep]).max()))
    return worst


def case(label: str, pairs, scale: float, repeats: int, dense_repeats: int) -> list:
    t_fast, sv = best_time(lambda: fast(pairs, scale), repeats)
    t32, _ = best_time(lambda: dense(pairs, scale, torch.float32), dense_repeats)
    t64, ref = best_time(lambda: dense(pairs, scale, torch.float64), dense_repeats)
    return [label, len(pairs), f"{t_fast * 1e3:.2f}", f"{t32 * 1e3:.0f}", f"{t64 * 1e3:.0f}",
            f"{t32 / t_fast:.0f}x", f"{t64 / t_fast:.0f}x", f"{max_rel_error(sv, ref):.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast path (best kept)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="repeats of the dense SVDs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    smol = factors([shape for _ in range(30) for shape in SMOLLM2.values()], r=64)
    big = factors([(4096, 4096)], r=16, seed=1)
    rows = [case("SmolLM2-135M shape, 30 x 7 modules, r=64", smol, 2.0, args.repeats, args.dense_repeats),
            case("4096 x 4096, r=16", big, 2.0, args.repeats, args.dense_repeats)]
    headers = ["adapter", "modules", "fast path ms", "dense f32 ms", "dense f64 ms", "speed-up vs f32",
               "speed-up vs f64", "max rel. error"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
