"""Structured shrinking of the bundled model: quality of every criterion and compensation, and
what a smaller model buys (file size, peak memory, prefill and decode latency) against the dense
model and a 50% unstructured SparseGPT model, measured side by side in one run.

Protocol (the calibrated-pruning benchmark's): calibrate with 32 random windows of 512 tokens
from WikiText-2 valid.txt (seed 0); perplexity on the first 32,768 tokens of test.txt in
non-overlapping 512-token windows. Shapes: MLP 1536 -> 1152, MLP 1536 -> 1024, and MLP 1152 with
KV groups 3 -> 2; each with criteria magnitude, wanda-sp, flap and compensations none, bias,
lstsq, every variant shrunk from the same dense weights.

Cost figures depend only on the architecture, so they are measured once per saved shape (a bias
adds a few thousand parameters; such shapes are measured separately): the safetensors file that
``save_pretrained`` writes, the peak resident memory of a fresh process that loads the folder and
runs one 512-token forward, and prefill (512 tokens) and greedy decode (64 tokens, KV cache)
latency, all models interleaved round by round.

Run (heavy, about 2-3 hours on 2 cores; run it alone):

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_shrink.py --json runs/bench_shrink.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prunescope import evaluate, models
from prunescope.pruning import job as pipeline
from prunescope.pruning.patterns import SparsityPattern
from prunescope.pruning.shrink import ShrinkConfig, make_plan, save_model, shrink_model
from prunescope.report import markdown_table, to_jsonable
import wikitext

SHAPES = {
    "mlp1152": dict(mlp=0.25),
    "mlp1024": dict(mlp=1 / 3),
    "mlp1152-kv2": dict(mlp=0.25, kv_groups=1),
}

_PEAK = r"""
import sys, torch
from pathlib import Path
def field(name):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
base = field("VmRSS")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
loaded = field("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
with torch.no_grad():
    model(input_ids=torch.randint(0, 1000, (1, 512)), use_cache=False)
print(base, loaded, field("VmHWM"))
"""


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=wikitext.WIKITEXT, help="folder with valid.txt and test.txt")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--criteria", default="magnitude,wanda-sp,flap")
    p.add_argument("--compensations", default="none,bias,lstsq")
    p.add_argument("--rows", default=None, metavar="SHAPE:CRITERION:COMPENSATION,...",
                   help="run only these variants instead of the grid of --shapes x --criteria x --compensations")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--latency-rounds", type=int, default=5)
    p.add_argument("--no-sparsegpt", action="store_true", help="leave out the 50%% SparseGPT row")
    wikitext.add_placement(p)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_shrink_models"),
                   help="saved folders for the size and memory figures (removed at the end)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here (updated after each row)")
    return p.parse_args()


def _variants(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(shape, criterion, compensation) of every variant to run, checked before any work."""
    if args.rows:
        variants = [tuple(r.split(":")) for r in args.rows.split(",")]
    else:
        variants = [(s, c, k) for s in args.shapes.split(",") for c in args.criteria.split(",")
                    for k in args.compensations.split(",")]
    for v in variants:
        if len(v) != 3 or v[0] not in SHAPES:
            raise SystemExit(f"bad variant {':'.join(v)!r}: want SHAPE:CRITERION:COMPENSATION, SHAPE in {', '.join(SHAPES)}")
    return variants  # type: ignore[return-value]


def _peak_memory(folder: Path) -> dict[str, int]:
    """RSS of a fresh process after imports, after loading ``folder``, and its peak in a forward."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(folder)], capture_output=True, text=True, check=True)
    base, loaded, peak = map(int, out.stdout.split()[-3:])
    return {"rss_imports": base, "rss_loaded": loaded, "peak_forward": peak}


def _safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    args = _args()
    variants = _variants(args)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    dense, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device)
    calib, blocks = wikitext.windows(
        tokenizer, args.data, args.calib_samples, args.calib_seqlen, args.eval_tokens, args.eval_seqlen, 0
    )
    first = next(dense.parameters())
    results: dict = {"args": vars(args), "rows": [], "costs": [],
                     "placement": f"{first.device}, {str(first.dtype).removeprefix('torch.')}"}

    def dump() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(to_jsonable(results), indent=2))

    dense_params = sum(p.numel() for p in dense.parameters())
    dense_ppl = evaluate.perplexity(dense, blocks, progress=False)
    print(f"dense: ppl {dense_ppl:.3f}, {dense_params:,} parameters", flush=True)
    saved = {"dense": dense}
    for shape, criterion, comp in variants:
        config = ShrinkConfig(model=args.model, criterion=criterion, compensation=comp, **SHAPES[shape])
        model = copy.deepcopy(dense)
        plan = make_plan(config, model)
        t0 = time.perf_counter()
        model, _, _ = shrink_model(model, config, plan, calib)
        seconds = time.perf_counter() - t0
        ppl = evaluate.perplexity(model, blocks, progress=False)
        params = sum(p.numel() for p in model.parameters())
        key = f"{shape}{'+bias' if plan.bias_flags else ''}"
        saved.setdefault(key, model)
        row = {"shape": shape, "criterion": criterion, "compensation": comp, "params": params,
               "removed": 1 - params / dense_params, "ppl": ppl, "shrink_seconds": seconds, "cost_key": key}
        results["rows"].append(row)
        dump()
        print(f"{shape:>12} {criterion:>9} {comp:>5}  ppl {ppl:9.3f}  shrink {seconds:6.1f} s", flush=True)
    if not args.no_sparsegpt:
        model = copy.deepcopy(dense)
        layers = pipeline.select_linear_layers(model)
        t0 = time.perf_counter()
        pipeline.prune_model(model, layers, "sparsegpt", SparsityPattern(0.5), "block", calib)
        seconds = time.perf_counter() - t0
        ppl = evaluate.perplexity(model, blocks, progress=False)
        results["rows"].append({"shape": "sparsegpt 50% unstructured", "criterion": "-", "compensation": "-",
                                "params": dense_params, "removed": 0.0, "ppl": ppl, "shrink_seconds": seconds,
                                "cost_key": "sparsegpt"})
        saved["sparsegpt"] = model
        print(f"sparsegpt 50%: ppl {ppl:.3f}", flush=True)
    dump()

    latency = evaluate.compare_latency(saved, dense.config.vocab_size, 512, 64, args.latency_rounds)
    for key, model in saved.items():
        folder = args.workdir / key
        save_model(model, tokenizer, folder)
        cost = {"key": key, "params": sum(p.numel() for p in model.parameters()),
                "safetensors_bytes": _safetensors_bytes(folder), **_peak_memory(folder),
                "prefill_seconds": latency[key].prefill_seconds,
                "decode_tokens_per_second": latency[key].decode_tokens_per_second,
                "prefill_all": latency[key].prefill_all, "decode_all": latency[key].decode_all}
        if key == "sparsegpt":
            from prunescope import formats

            cost["sparse_format_bytes"] = formats.save_sparse(model, folder.with_name("sparsegpt-sparse")).file_bytes
        results["costs"].append(cost)
        dump()
    shutil.rmtree(args.workdir, ignore_errors=True)
    _print_tables(results, dense_ppl, args, blocks.numel())


def _print_tables(results: dict, dense_ppl: float, args: argparse.Namespace, eval_tokens: int) -> None:
    costs = {c["key"]: c for c in results["costs"]}
    dense = costs["dense"]
    print()
    print(f"{args.model}, WikiText-2: calibration {args.calib_samples} x {args.calib_seqlen} tokens of valid.txt, "
          f"perplexity on the first {eval_tokens:,} tokens of test.txt ({args.eval_seqlen}-token windows), "
          f"{results['placement']}, {torch.get_num_threads()} threads; dense perplexity {dense_ppl:.3f}")
    print(markdown_table(
        ["shape", "criterion", "compensation", "parameters removed", "perplexity", "x dense", "shrink time (s)"],
        [(r["shape"], r["criterion"], r["compensation"], f"{100 * r['removed']:.1f}%", f"{r['ppl']:.2f}",
          f"{r['ppl'] / dense_ppl:.2f}", f"{r['shrink_seconds']:.0f}") for r in results["rows"]],
    ))
    print()
    print(f"cost of each saved model (latency: median of {args.latency_rounds} interleaved rounds; "
          "peak: resident set of a fresh process that loads the folder and runs a 512-token forward)")
    rows = []
    for key, c in costs.items():
        rows.append((
            key, f"{c['params'] / 1e6:.1f}M", f"{c['safetensors_bytes'] / 2**20:.0f}"
            + (f" ({c['sparse_format_bytes'] / 2**20:.0f} sparse format)" if "sparse_format_bytes" in c else ""),
            f"{c['peak_forward'] / 2**20:.0f}", f"{1000 * c['prefill_seconds']:.0f}",
            f"{dense['prefill_seconds'] / c['prefill_seconds']:.2f}x", f"{c['decode_tokens_per_second']:.1f}",
            f"{c['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x",
        ))
    print(markdown_table(
        ["model", "parameters", "safetensors (MB)", "peak RSS of a forward (MB)", "prefill 512 (ms)",
         "prefill speed-up", "decode 64 (tokens/s)", "decode speed-up"], rows,
    ))


if __name__ == "__main__":
    main()
