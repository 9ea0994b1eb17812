"""WikiText-2 quality and prune time of magnitude, Wanda, RIA and SparseGPT on the bundled model.

A method may carry modifiers joined by ``+``: ``owl`` (OWL's layerwise allocation, outlier ratios
measured once on the dense model, M = 5, lambda = 0.08) and ``dsnot`` (DSnoT mask refinement),
e.g. ``--methods wanda,wanda+owl,sparsegpt+dsnot``; OWL's ratio pass is timed into each row.

Protocol (as in the Wanda / SparseGPT papers): calibrate with 32 random windows of 512 tokens from
valid.txt (seed 0); evaluate perplexity on the first 32,768 tokens of test.txt in non-overlapping
512-token windows. Every configuration is pruned from the same dense weights in one run, so the
times are measured side by side. Magnitude uses the per-layer scope here, the baseline of both
papers (``prunescope prune`` defaults to global magnitude).

Run (heavy: about 30 minutes on 2 cores):

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_llm_prune.py --json runs/bench_llm_prune.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from prunescope import evaluate, models
from prunescope.pruning import job as pipeline
from prunescope.pruning import owl
from prunescope.pruning.apply import apply_weights
from prunescope.pruning.patterns import parse_pattern
from prunescope.report import markdown_table, to_jsonable
import wikitext



def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=wikitext.WIKITEXT, help="folder with valid.txt and test.txt")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="0.5,2:4,4:8")
    p.add_argument("--magnitude-scope", default="layer", choices=("global", "layer", "row"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    wikitext.add_placement(p)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here (updated after each row)")
    return p.parse_args()


def _scope(method: str, pattern, magnitude_scope: str) -> str:
    if pattern.is_nm:
        return "group"
    return magnitude_scope if method == "magnitude" else pipeline.SCOPES[method][0]


def _spec(text: str) -> tuple[str, str, bool]:
    """``method[+owl][+dsnot]`` -> (method, refine, owl)."""
    method, *mods = text.split("+")
    unknown = set(mods) - {"owl", "dsnot"}
    if unknown or method not in pipeline.METHODS:
        raise SystemExit(f"bad method spec {text!r}: METHOD[+owl][+dsnot], METHOD one of {pipeline.METHODS}")
    return method, "dsnot" if "dsnot" in mods else "none", "owl" in mods


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device)
    calib, blocks = wikitext.windows(
        tokenizer, args.data, args.calib_samples, args.calib_seqlen, args.eval_tokens, args.eval_seqlen, args.seed
    )
    layers = pipeline.select_linear_layers(model)
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(f"{row['method']:>10} {row['pattern']:>12}  ppl {row['ppl']:10.3f}  prune {row['prune_seconds']:7.1f} s", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(to_jsonable({"args": vars(args), "rows": rows}), indent=2))

    ratios: dict[int, float] | None = None
    ratio_seconds = 0.0
    if "+owl" in args.methods:
        t0 = time.perf_counter()
        grouped = pipeline._group_by_decoder_layer(model, layers)
        ratios = pipeline.owl_ratios(model, grouped, calib, owl.DEFAULT_M)
        ratio_seconds = time.perf_counter() - t0
    dense_ppl = evaluate.perplexity(model, blocks, progress=False)
    record({"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": dense_ppl, "prune_seconds": 0.0})
    for text in args.patterns.split(","):
        pattern = parse_pattern(text)
        for spec in args.methods.split(","):
            method, refine, use_owl = _spec(spec)
            if use_owl and pattern.is_nm:
                continue  # OWL varies unstructured sparsity only
            apply_weights(model, dense)
            sparsities = owl.allocate_by_index(ratios, pattern.sparsity) if use_owl and ratios else None
            t0 = time.perf_counter()
            pipeline.prune_model(model, layers, method, pattern, _scope(method, pattern, args.magnitude_scope), calib,
                                 sparsities=sparsities, refine=refine)
            seconds = time.perf_counter() - t0 + (ratio_seconds if use_owl else 0.0)
            zeros, total = pipeline.actual_sparsity(layers)
            label = f"{100 * pattern.sparsity:.0f}% unstructured" if not pattern.is_nm else pattern.label
            ppl = evaluate.perplexity(model, blocks, progress=False)
            record({"method": spec, "pattern": label, "sparsity": zeros / total, "ppl": ppl, "prune_seconds": seconds})
    print()
    print(f"{args.model}, WikiText-2: calibration {args.calib_samples} x {args.calib_seqlen} tokens of valid.txt, "
          f"perplexity on the first {blocks.numel():,} tokens of test.txt ({args.eval_seqlen}-token windows), "
          f"{next(model.parameters()).device}, {str(next(model.parameters()).dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads")
    print(markdown_table(
        ["method", "pattern", "sparsity", "perplexity", "x dense", "prune time (s)"],
        [(r["method"], r["pattern"], f"{100 * r['sparsity']:.1f}%", f"{r['ppl']:.2f}",
          f"{r['ppl'] / dense_ppl:.2f}", f"{r['prune_seconds']:.1f}") for r in rows],
    ))


if __name__ == "__main__":
    main()
