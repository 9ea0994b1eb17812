"""prunescope.prune against torch.nn.utils.prune on a SmolLM2-135M-shaped stack of Linear layers.

The model: 30 blocks of q 576x576, k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536
(210 Linear weights, 106M parameters, no bias), with random weights of distinct magnitudes so
that both libraries must choose the very same mask. Each memory figure comes from a fresh
subprocess: its resident set is read after the model is built, the kernel's peak counter is
reset (``/proc/self/clear_refs``), the operation runs, and the new peak (VmHWM) minus the
baseline is the operation's extra peak memory, everything torch allocates included.

Printed, side by side from one run: global_unstructured at 50% (time, extra peak memory,
identical mask), the memory a pruned model holds, forward latency against the dense model,
and the state-dict size. Run it alone (it is CPU- and memory-heavy; torch's global pruning
needs about 5 GB at its peak):

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_prune.py
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tp
from torch import nn

import prunescope.prune as pp

HIDDEN, KV, MLP = 576, 192, 1536


class Block(nn.Module):
    """The Linear layers of one Llama decoder layer, wired so every output is used."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.down_proj = nn.Linear(MLP, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 576]
        h = F.layer_norm(x, (HIDDEN,))
        kv = (self.k_proj(h) * self.v_proj(h)).repeat(1, 1, HIDDEN // KV)  # [B, T, 576]
        x = x + self.o_proj(self.q_proj(h) + kv)
        h = F.layer_norm(x, (HIDDEN,))
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def fill_distinct(model: nn.Module, seed: int = 0) -> None:
    """Random signs and distinct magnitudes (about 8e-6 to 0.05) in random order across layers."""
    g = torch.Generator().manual_seed(seed)
    layers = linears(model)
    total = sum(m.weight.numel() for m in layers)
    rank = torch.randperm(total, generator=g, dtype=torch.int32)  # [total]
    base = 0x37000000  # float32 bits of 2**-17
    offset = 0
    for m in layers:
        n = m.weight.numel()
        sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) * (-(2**31))
        bits = (rank[offset : offset + n] + base) | sign
        m.weight.copy_(bits.view(torch.float32).view(m.weight.shape))
        offset += n


def build(layers: int) -> Stack:
    torch.manual_seed(0)
    model = Stack(layers).eval()
    fill_distinct(model)
    for p in model.parameters():
        p.requires_grad_(False)  # inference benchmark; pruning itself does not care
    return model


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux >= 4.0)


def held_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers, attributes."""
    storages: dict[int, int] = {}
    for m in model.modules():
        tensors = list(m._parameters.values()) + list(m._buffers.values())
        tensors += [v for v in m.__dict__.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is not None:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def mask_digest(model: nn.Module) -> tuple[str, int]:
    """SHA-256 of all weight masks (as 0/1 bytes, layer by layer) and the number pruned."""
    h, pruned = hashlib.sha256(), 0
    for m in linears(model):
        mask = m.weight_mask.bool()
        h.update(mask.numpy().tobytes())
        pruned += int((~mask).sum())
    return h.hexdigest(), pruned


def state_dict_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sd.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


def worker_global(lib: str, layers: int, repeats: int) -> dict:
    """One library's global_unstructured(50%) in this fresh process: time and extra peak memory."""
    mod = tp if lib == "torch" else pp
    model = build(layers)
    pairs = [(m, "weight") for m in linears(model)]
    dense = held_bytes(model)
    gc.collect()
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    mod.global_unstructured(pairs, mod.L1Unstructured, amount=0.5)
    seconds = [time.perf_counter() - t0]
    peak = rss_bytes("VmHWM") - base
    gc.collect()
    retained = rss_bytes() - base
    digest, pruned = mask_digest(model)
    held = held_bytes(model)
    sd_bytes = state_dict_bytes(model)
    for _ in range(repeats - 1):  # timing only: undo, refill the same weights, prune again
        for m, name in pairs:
            mod.remove(m, name)
        fill_distinct(model)
        t0 = time.perf_counter()
        mod.global_unstructured(pairs, mod.L1Unstructured, amount=0.5)
        seconds.append(time.perf_counter() - t0)
    return {
        "lib": lib, "seconds": seconds, "extra_peak": peak, "retained": retained, "dense_bytes": dense,
        "held_bytes": held, "digest": digest, "pruned": pruned, "state_dict_bytes": sd_bytes,
        "params": sum(m.weight.numel() for m in linears(model)), "tensors": len(pairs),
    }


def worker_dense(layers: int) -> dict:
    model = build(layers)
    return {"state_dict_bytes": state_dict_bytes(model), "held_bytes": held_bytes(model)}


@torch.no_grad()
def worker_latency(layers: int, tokens: int, rounds: int) -> dict:
    """Dense vs prunescope-pruned vs torch-pruned (same masks) forward, interleaved rounds."""
    dense = build(layers)
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    pp.global_unstructured([(m, "weight") for m in linears(ours)], pp.L1Unstructured, amount=0.5)
    for mo, mt in zip(linears(ours), linears(theirs)):
        tp.custom_from_mask(mt, "weight", mo.weight_mask)
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    outputs = {name: m(x) for name, m in (("dense", dense), ("ours", ours), ("torch", theirs))}
    times: dict[str, list[float]] = {"dense": [], "ours": [], "torch": []}
    for r in range(rounds):
        order = [("dense", dense), ("ours", ours), ("torch", theirs)]
        for name, m in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "same_output": bool(torch.equal(outputs["ours"], outputs["torch"])),
        "tokens": tokens,
        "rounds": rounds,
    }


def run_worker(common: list[str], *worker: str) -> dict:
    """Run one measurement in a fresh Python process; it prints its result as JSON."""
    cmd = [sys.executable, __file__, *common, "--worker", *worker]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(dense: dict, t: dict, o: dict, lat: dict) -> str:
    mb = 1 / 2**20
    w = t["dense_bytes"]
    med, lo = lat["median_s"], lat["min_s"]
    rows = [
        ("global_unstructured 50%: time (s, median)", f"{statistics.median(t['seconds']):.2f}",
         f"{statistics.median(o['seconds']):.2f}", f"{statistics.median(t['seconds']) / statistics.median(o['seconds']):.1f}x faster"),
        ("  extra peak memory / weights' bytes", f"{t['extra_peak'] / w:.2f}", f"{o['extra_peak'] / w:.2f}",
         f"{t['extra_peak'] / o['extra_peak']:.1f}x less"),
        ("  entries pruned", f"{t['pruned']:,}", f"{o['pruned']:,}",
         "same mask" if t["digest"] == o["digest"] else "MASKS DIFFER"),
        ("pruned model: tensors held / dense", f"{t['held_bytes'] / w:.2f}", f"{o['held_bytes'] / w:.2f}",
         f"{t['held_bytes'] / o['held_bytes']:.1f}x less"),
        ("pruned model: resident memory / dense", f"{(w + t['retained']) / w:.2f}", f"{(w + o['retained']) / w:.2f}", ""),
        (f"forward latency ({lat['tokens']} tokens) / dense: median", f"{med['torch'] / med['dense']:.3f}",
         f"{med['ours'] / med['dense']:.3f}", "same output" if lat["same_output"] else "OUTPUTS DIFFER"),
        ("  fastest of the rounds", f"{lo['torch'] / lo['dense']:.3f}", f"{lo['ours'] / lo['dense']:.3f}", ""),
        ("state dict (MB; dense {:.0f})".format(dense["state_dict_bytes"] * mb), f"{t['state_dict_bytes'] * mb:.0f}",
         f"{o['state_dict_bytes'] * mb:.0f}", f"{t['state_dict_bytes'] / o['state_dict_bytes']:.2f}x smaller"),
    ]
    lines = [
        f"model: {t['tensors']} Linear weights, {t['params'] / 1e6:.1f}M parameters ({w * mb:.0f} MB float32); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| measure | torch.nn.utils.prune | prunescope.prune | prunescope vs torch |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append("")
    lines.append(f"time per run (s): torch {['%.2f' % s for s in t['seconds']]}, prunescope {['%.2f' % s for s in o['seconds']]}; "
                 f"forward medians (s): dense {med['dense']:.3f}, prunescope {med['ours']:.3f}, torch {med['torch']:.3f} "
                 f"over {lat['rounds']} interleaved rounds")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="decoder blocks (30 = SmolLM2-135M)")
    ap.add_argument("--torch-repeats", type=int, default=1, help="torch global_unstructured runs (20-45 s each)")
    ap.add_argument("--repeats", type=int, default=3, help="prunescope global_unstructured runs")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per forward for latency")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind = args.worker[0]
        if kind == "global":
            res = worker_global(args.worker[1], args.layers, int(args.worker[2]))
        elif kind == "dense":
            res = worker_dense(args.layers)
        else:
            res = worker_latency(args.layers, args.tokens, args.rounds)
        print(json.dumps(res))
        return
    common = ["--layers", str(args.layers), "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    dense = run_worker(common, "dense")
    torch_res = run_worker(common, "global", "torch", str(args.torch_repeats))
    ours_res = run_worker(common, "global", "ours", str(args.repeats))
    latency = run_worker(common, "latency")
    print(table(dense, torch_res, ours_res, latency))


if __name__ == "__main__":
    main()
