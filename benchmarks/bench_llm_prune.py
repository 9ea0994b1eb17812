"""WikiText-2 quality and prune time of magnitude, Wanda, RIA and SparseGPT on the bundled model.

A method may carry modifiers joined by ``+``: ``owl`` (OWL's layerwise allocation, outlier ratios
measured once on the dense model, M = 5, lambda = 0.08), ``dsnot`` (DSnoT mask refinement) and
``permute`` (N:M only: RIA's channel permutation of the MLP units, ``prune --permute``), e.g.
``--methods wanda,wanda+owl,sparsegpt+dsnot,ria+permute``; OWL's ratio pass is timed into each row.

With ``--peer`` every Wanda / SparseGPT row (with or without ``+owl``) is also pruned by
llm-compressor's ``oneshot`` (its sequential pipeline, its own OWL profile for ``+owl``) in its own
virtual environment and process (``benchmarks/peers``, made on first use), on the same model folder
and the very same calibration windows (saved by this script), with the same thread count; its
pruned weights are then loaded here and evaluated on the same test windows. The peer's time is its
``oneshot`` call (calibration and pruning, like prunescope's row), not its model load or save.

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
import os
import subprocess
import time
from pathlib import Path

import torch

from prunescope import evaluate, models
from prunescope.pruning import job as pipeline
from prunescope.pruning import owl
from prunescope.pruning.apply import apply_weights
from prunescope.pruning.patterns import parse_pattern
from prunescope.report import markdown_table, to_jsonable
import peer
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
    p.add_argument("--peer", action="store_true",
                   help="also prune each wanda/sparsegpt row with llm-compressor (benchmarks/peers)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_llm_prune"),
                   help="folder for the peer's windows, pruned models and logs (with --peer)")
    return p.parse_args()


def _scope(method: str, pattern, magnitude_scope: str) -> str:
    if pattern.is_nm:
        return "group"
    return magnitude_scope if method == "magnitude" else pipeline.SCOPES[method][0]


def _spec(text: str) -> tuple[str, str, bool, bool]:
    """``method[+owl][+dsnot][+permute]`` -> (method, refine, owl, permute)."""
    method, *mods = text.split("+")
    unknown = set(mods) - {"owl", "dsnot", "permute"}
    if unknown or method not in pipeline.METHODS:
        raise SystemExit(f"bad method spec {text!r}: METHOD[+owl][+dsnot][+permute], METHOD one of "
                         f"{pipeline.METHODS}")
    return method, "dsnot" if "dsnot" in mods else "none", "owl" in mods, "permute" in mods


def run_peer(python: str, model_dir: str, windows: Path, method: str, pattern, use_owl: bool, dtype: str,
             out: Path) -> dict:
    """llm-compressor's ``oneshot`` on ``model_dir`` with ``windows`` in its own process; its JSON
    record (``seconds``: the oneshot call). Threads as in this process, progress bars off."""
    cmd = [python, str(peer.PEERS / "llmcompressor_run.py"),
           "--model", model_dir, "--windows", str(windows), "--method", method,
           "--sparsity", str(pattern.sparsity), "--mask-structure", "2:4" if pattern.is_nm else "0:0",
           "--dtype", dtype, "--pipeline", "sequential", "--save", str(out), "--json", str(out.with_suffix(".json"))]
    if use_owl:
        cmd.append("--owl")
    if pattern.is_nm and (pattern.n, pattern.m) != (2, 4):
        raise SystemExit(f"the peer script prunes N:M only as 2:4, not {pattern.label}")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor failed ({done.returncode}), log in {out.with_suffix('.log')}")
    return json.loads(out.with_suffix(".json").read_text())


def load_pruned(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The ``names`` modules' weights from a saved dense HF folder (the peer's output)."""
    from safetensors import safe_open

    wanted = {f"{n}.weight": n for n in names}
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key in wanted:
                    found[wanted[key]] = fh.get_tensor(key)
    missing = sorted(set(names) - set(found))
    if missing:
        raise SystemExit(f"{folder}: no weights for {missing[:3]}...")
    return found


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
    peer_python = peer.llmcompressor_python() if args.peer else None
    windows_file = args.work / "calib.pt"
    if args.peer:
        args.work.mkdir(parents=True, exist_ok=True)
        torch.save(calib, windows_file)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    dense_ppl = evaluate.perplexity(model, blocks, progress=False)
    record({"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": dense_ppl, "prune_seconds": 0.0})
    for text in args.patterns.split(","):
        pattern = parse_pattern(text)
        for spec in args.methods.split(","):
            method, refine, use_owl, permute = _spec(spec)
            if (use_owl and pattern.is_nm) or (permute and not pattern.is_nm):
                continue  # OWL varies unstructured sparsity only; permuting serves N:M only
            apply_weights(model, dense)
            sparsities = owl.allocate_by_index(ratios, pattern.sparsity) if use_owl and ratios else None
            t0 = time.perf_counter()
            pipeline.prune_model(model, layers, method, pattern, _scope(method, pattern, args.magnitude_scope), calib,
                                 sparsities=sparsities, refine=refine, permute=permute)
            seconds = time.perf_counter() - t0 + (ratio_seconds if use_owl else 0.0)
            zeros, total = pipeline.actual_sparsity(layers)
            label = f"{100 * pattern.sparsity:.0f}% unstructured" if not pattern.is_nm else pattern.label
            ppl = evaluate.perplexity(model, blocks, progress=False)
            record({"method": spec, "pattern": label, "sparsity": zeros / total, "ppl": ppl, "prune_seconds": seconds})
            if peer_python and method in ("wanda", "sparsegpt") and refine == "none" and not permute:
                out = args.work / f"llmc-{spec}-{text}".replace(":", "_").replace(".", "p")  # no dot: with_suffix
                rec = run_peer(peer_python, models.resolve(args.model), windows_file, method, pattern, use_owl,
                               dtype, out)
                apply_weights(model, load_pruned(out, list(layers)))
                zeros, total = pipeline.actual_sparsity(layers)
                record({"method": f"llm-compressor {spec}", "pattern": label, "sparsity": zeros / total,
                        "ppl": evaluate.perplexity(model, blocks, progress=False),
                        "prune_seconds": rec["seconds"], "peer_version": rec.get("llmcompressor_version")})
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
