"""Pruning a model larger than memory: peak resident memory and masks, offloaded against in memory.

The benchmark writes a random Llama with the shapes of TinyLlama-1.1B (hidden 2048, 22 layers,
MLP 5632, 32 heads, 4 KV heads, vocab 32000) as bfloat16 safetensors in shards (about 2.2 GB;
never committed: it lives under ``--work`` and is deleted unless ``--keep``), then runs, each in a
fresh process so that its peak resident memory (``ru_maxrss`` from ``os.wait4``: Python, torch,
transformers and everything else included) is its own:

* ``prunescope prune CKPT --method M --offload --save`` (one decoder layer in memory at a time,
  each pruned layer written as its own shard), and
* the same command with ``--no-offload`` (the whole model in memory, saved as a sparse checkpoint),

for Wanda and SparseGPT at 50% with 8 x 256 calibration tokens, and compares the two saved
models tensor by tensor (masks and values). The checkpoint is written and the models compared in
processes of their own too: on Linux a child's peak RSS starts from the resident size of the
process it was forked from, so this driver never holds a model. The tokenizer is a small byte-level BPE (token ids
below the vocabulary size); the calibration text is the default (pydoc).

With ``--peer`` the same checkpoint is pruned by llm-compressor's ``oneshot`` with its
sequential pipeline (Wanda / SparseGPT modifiers at 50%, the decoder layers' Linears, on the same
calibration windows, which this driver writes from prunescope's own sampling), in the peer's own
virtual environment (``benchmarks/peers``, made on first use) and its own process, for its prune
time and peak RSS; its masks are its own (not compared).

``--dtype`` is the compute dtype (default float32: this CPU computes bfloat16 matrix products
about 8x slower than float32; on a GPU pass bfloat16). The pruned model is written in it, so in
float32 the written shards are twice the checkpoint's bytes. Run it alone:

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_offload.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """The random TinyLlama-shaped bfloat16 checkpoint in ~500 MB shards; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunescope.testing import tiny_tokenizer

    config = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # std 0.02 normal init, as pre-training starts
    model.save_pretrained(folder, max_shard_size="500MB")
    tiny_tokenizer(vocab_size=1000).save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed_child(cmd: list[str], **popen: Any) -> tuple[int, float]:
    """Run ``cmd`` to the end (progress bars off); its own peak RSS in bytes (``ru_maxrss`` from
    ``os.wait4``) and wall seconds. A failure ends the benchmark with the command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, **popen)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        log = getattr(popen.get("stderr"), "name", None)
        where = f", log in {log}" if log else ""
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}{where}): {' '.join(cmd)}")
    return usage.ru_maxrss * 1024, wall


def run_prune(ckpt: Path, out: Path, method: str, offload: bool, args: argparse.Namespace) -> dict:
    """One ``prunescope prune`` in its own process; its report plus its peak RSS and wall time."""
    cmd = [sys.executable, "-m", "prunescope", "-q", "prune", str(ckpt), "--method", method,
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
           "--dtype", args.dtype, "--device", args.device, "--no-eval", "--save", "--out", str(out),
           "--overwrite", "--offload" if offload else "--no-offload"]
    peak, wall = timed_child(cmd)
    report = json.loads((out / "report.json").read_text())
    return {**report, "peak_rss": peak, "wall": wall}


def compare(offloaded: Path, in_memory: Path) -> tuple[bool, bool, int]:
    """(masks equal, values equal, tensors compared) between the offloaded HF shards and the
    in-memory sparse checkpoint, one tensor at a time from the shards."""
    import torch
    from safetensors import safe_open

    from prunescope import formats

    reference = formats.load_sparse(in_memory)
    index = json.loads((offloaded / "model.safetensors.index.json").read_text())["weight_map"]
    masks_equal = values_equal = True
    for key, file in index.items():
        with safe_open(str(offloaded / file), framework="pt") as fh:
            got = fh.get_tensor(key)
        want = reference[key]
        masks_equal &= bool(torch.equal(got != 0, want != 0))
        values_equal &= bool(torch.equal(got, want))
    return masks_equal, values_equal, len(index)


def write_windows(ckpt: Path, path: Path, samples: int, seqlen: int) -> None:
    """The calibration windows prunescope's prune job takes from ``ckpt`` (same text, tokenizer,
    sampling and seed), saved for the peer as a ``LongTensor[samples, seqlen]``."""
    import torch
    from transformers import AutoTokenizer

    from prunescope.pruning.job import PruneConfig

    config = PruneConfig(model=str(ckpt), calib_samples=samples, calib_seqlen=seqlen, evaluate=False)
    torch.save(config.calibration_windows(AutoTokenizer.from_pretrained(ckpt)), path)


def run_peer(ckpt: Path, out: Path, method: str, windows: Path, args: argparse.Namespace) -> dict:
    """llm-compressor's ``oneshot`` (its sequential pipeline) on the same checkpoint and windows,
    in its own virtual environment and process (``benchmarks/peers``); its JSON record plus its
    peak RSS and wall time."""
    import peer

    here = peer.PEERS
    python = peer.llmcompressor_python()
    record = out.with_suffix(".json")
    cmd = [python, str(here / "llmcompressor_run.py"), "--model", str(ckpt), "--windows", str(windows),
           "--method", method, "--sparsity", "0.5", "--dtype", args.dtype, "--pipeline", "sequential",
           "--save", str(out), "--json", str(record)]
    with open(out.with_suffix(".log"), "w") as log:  # its own logging, kept out of the table
        peak, wall = timed_child(cmd, stdout=subprocess.DEVNULL, stderr=log)
    report = json.loads(record.read_text())
    return {"prune_seconds": report["seconds"], "peak_rss": peak, "wall": wall,
            "version": report.get("llmcompressor_version", "?")}


def in_child(*argv: str) -> str:
    """Run this script with ``argv`` in a fresh process (so the driver stays small); its stdout."""
    return subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True).stdout


def main() -> None:
    if sys.argv[1:2] == ["--child-write"]:
        write_checkpoint(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if sys.argv[1:2] == ["--child-windows"]:
        write_windows(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    if sys.argv[1:2] == ["--child-compare"]:
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-offload"))
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama: 22)")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32; see above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the pruned models")
    parser.add_argument("--offload-only", action="store_true",
                        help="skip the in-memory reference runs (and the comparison of masks)")
    parser.add_argument("--peer", action="store_true",
                        help="also run llm-compressor's sequential pipeline (its own venv, made on first use: "
                             "benchmarks/peers) on the same checkpoint and calibration windows")
    parser.add_argument("--prunescope", action=argparse.BooleanOptionalAction, default=True,
                        help="run prunescope (--no-prunescope: only the peer)")
    args = parser.parse_args()

    ckpt = args.work / "tinyllama-shaped-bf16"
    if not any(ckpt.glob("*.safetensors")):
        print(f"writing the random checkpoint to {ckpt} ...", flush=True)
        in_child("--child-write", str(ckpt), str(args.layers))
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt_bytes / 1e9:.3f} GB in {len(list(ckpt.glob('*.safetensors')))} shards, "
          f"{args.layers} layers; compute dtype {args.dtype}; calibration {args.calib_samples} x {args.calib_seqlen}")
    rows = []
    windows = args.work / "calibration-windows.pt"
    if args.peer:
        in_child("--child-windows", str(ckpt), str(windows), str(args.calib_samples), str(args.calib_seqlen))
    for method in args.methods.split(","):
        if args.peer:
            r = run_peer(ckpt, args.work / f"{method}-llmcompressor", method, windows, args)
            rows.append((method, f"llm-compressor {r['version']} sequential", r["prune_seconds"],
                         r["prune_seconds"] / args.layers, r["wall"], r["peak_rss"], r["peak_rss"] / ckpt_bytes,
                         "(its own masks)"))
        if not args.prunescope:
            continue
        runs = {}
        for offload in (True,) if args.offload_only else (True, False):
            out = args.work / f"{method}-{'offload' if offload else 'memory'}"
            runs[offload] = run_prune(ckpt, out, method, offload, args)
        equal = "(not compared)"
        if not args.offload_only:
            masks_equal, values_equal, n = json.loads(in_child(
                "--child-compare", str(args.work / f"{method}-offload" / "model"),
                str(args.work / f"{method}-memory" / "model")))
            equal = f"{masks_equal} / {values_equal} ({n} tensors)"
        for offload, r in runs.items():
            rows.append((method, "offload" if offload else "in memory", r["prune_seconds"],
                         r["prune_seconds"] / args.layers, r["wall"], r["peak_rss"], r["peak_rss"] / ckpt_bytes,
                         equal if offload else "(reference)"))
    print("\n| method | run | prune s | s per layer | wall s | peak RSS GB | peak RSS / checkpoint | "
          "masks / values equal to in-memory |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for m, mode, p, pl, w, rss, ratio, eq in rows:
        print(f"| {m} | {mode} | {p:.1f} | {pl:.2f} | {w:.1f} | {rss / 1e9:.2f} | {ratio:.2f} | {eq} |")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
