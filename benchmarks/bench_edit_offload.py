"""One step of ``prunescope edit``'s fit on a model larger than memory: peak resident memory and
gradients, weights on disk against in memory.

The benchmark writes the random TinyLlama-1.1B-shaped bfloat16 checkpoint of
``bench_offload.py`` (about 2.2 GB, never committed: under ``--work``, deleted unless ``--keep``),
then runs one fit step, each in a fresh process so that its peak resident memory (``ru_maxrss``
from ``os.wait4``) is its own, three ways:

* ``memory``: the whole model loaded (what ``prunescope edit`` does without ``--offload``);
* ``disk``: the weights on disk (accelerate's dispatch, ``--offload``'s loading) but backward
  straight through, as the fit ran before ``--offload`` existed: autograd keeps every weight it
  multiplied by, read from disk for the forward;
* ``disk+recompute``: what ``prunescope edit --offload`` does: each decoder layer (and the output
  head) run under ``prunescope.models.recomputed_layers``, so backward reads each layer's weights
  again instead.

``disk`` runs last: it may be killed for memory, which the table then says.

The step is the fit's own machinery (``prunescope.edit.fields`` and ``hooks``), shaped like a fit
step on several templates and fields: vectors added at ``--layers`` (zeros, requiring grad); for
each of ``--templates`` prompts its KV cache (``fields.prompt_cache``) and ``--fields`` batches of
continuations teacher-forced after it (``fields.teacher_forced``); a batch of unrelated windows;
a loss on all their logits, backward. The driver compares each run's gradients with the
in-memory run's.

Memory is read three ways: the process's peak RSS (loading included); the step's peak RSS
(``VmHWM`` reset through ``/proc/self/clear_refs`` before the step), which also counts pages of
memory-mapped weight files; and the step's peak anonymous memory (``RssAnon`` sampled every 5 ms:
a shorter peak can be missed), which is what autograd holds. In float32 compute accelerate
converts the bfloat16 checkpoint into float32 files it maps, and a weight read from them for a
forward is an anonymous copy, so the anonymous peak shows the weights backward keeps; in
bfloat16 they may be views of the mapped file and show in the step's RSS instead. The
in-memory run's anonymous memory includes the whole model. Run it alone:

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_edit_offload.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench_offload import in_child, timed_child

MODES = ("memory", "disk+recompute", "disk")  # the one that may run out of memory last


def fit_step(ckpt: Path, mode: str, layers: list[int], args: argparse.Namespace, grads: Path) -> dict:
    """One fit step in ``mode`` (in this process); its seconds and loss, the gradients saved to
    ``grads``."""
    import contextlib

    import torch

    from prunescope import models
    from prunescope.edit import fields
    from prunescope.edit.hooks import Edit, LayerEdit, applied

    model, _tok = models.load(str(ckpt), dtype=args.dtype, device=args.device, offload=mode != "memory")
    model.requires_grad_(False)  # frozen, as the fit freezes it
    device = models.input_device(model)
    hidden = model.config.hidden_size
    vectors = {i: torch.zeros(hidden, device=device, requires_grad=True) for i in layers}  # [hidden] each
    edit = Edit([LayerEdit(i, add=vectors[i]) for i in layers])
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # the benchmark's tokenizer's
    prompts = [tuple(torch.randint(3, vocab, (args.prompt,), generator=gen).tolist()) for _ in range(args.templates)]
    suffixes = [[tuple(torch.randint(3, vocab, (args.suffix,), generator=gen).tolist()) for _ in range(args.suffixes)]
                for _ in range(args.fields)]
    windows = torch.randint(3, vocab, (args.windows, args.window_len), generator=gen).to(device)  # [W, L]
    recompute = models.recomputed_layers(model) if mode == "disk+recompute" else contextlib.nullcontext()
    from bench_prune import reset_peak, rss_bytes  # its /proc/self/status readers

    before = rss_bytes("RssAnon")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak()  # the peak RSS (VmHWM) from here: the step's own
    with _PeakSampler("RssAnon") as anon:
        start = time.perf_counter()
        with applied(model, edit), recompute:
            loss = torch.zeros((), device=device)
            for prompt in prompts:  # as the fit reads each template's fields
                cache, at = fields.prompt_cache(model, prompt)
                for seqs in suffixes:
                    logits = fields.teacher_forced(model, cache, at, seqs)[0].float()  # [S, suffix, V]
                    loss = loss + logits.logsumexp(-1).mean() - logits[..., 5].mean()
            text = model(input_ids=windows).logits.float()  # [W, L, V]
            loss = loss + text.logsumexp(-1).mean() - text[..., 7].mean()
            loss.backward()
        seconds = time.perf_counter() - start
    torch.save({i: v.grad.cpu() for i, v in vectors.items()}, grads)
    return {"seconds": seconds, "loss": float(loss.detach()), "step_peak_rss": rss_bytes("VmHWM"),
            "anon_before": before, "step_peak_anon": anon.peak,
            "step_peak_gpu": torch.cuda.max_memory_allocated(device) if cuda else None}


class _PeakSampler:
    """The largest value of a ``/proc/self/status`` figure, read every 5 ms in a thread while the
    block runs (anonymous memory has no peak counter of its own; a shorter peak can be missed)."""

    def __init__(self, field: str) -> None:
        import threading

        from bench_prune import rss_bytes

        self._read = rss_bytes
        self.field, self.peak, self._stop = field, rss_bytes(field), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._read(self.field))

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read(self.field))


def same_grads(got: Path, want: Path) -> float:
    """The largest relative difference of the layers' gradients."""
    import torch

    a, b = torch.load(got), torch.load(want)
    return max(float((a[i] - b[i]).norm() / b[i].norm().clamp_min(1e-30)) for i in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-edit-offload"))
    parser.add_argument("--model-layers", type=int, default=22, help="decoder layers of the checkpoint (TinyLlama: 22)")
    parser.add_argument("--layers", default="9-13", help="edited layers, FIRST-LAST (default 9-13 of 22)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--templates", type=int, default=4, help="prompts, each with its own cache (default 4)")
    parser.add_argument("--fields", type=int, default=2, help="teacher-forced batches per prompt (default 2)")
    parser.add_argument("--prompt", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--suffixes", type=int, default=8, help="continuations per batch (default 8)")
    parser.add_argument("--suffix", type=int, default=16, help="tokens per continuation (default 16)")
    parser.add_argument("--windows", type=int, default=4, help="unrelated windows (default 4; the fit's: 8)")
    parser.add_argument("--window-len", type=int, default=128, help="tokens per window (default 128, as the fit)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (default float32: see bench_offload.py)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--child", nargs=3, metavar=("CKPT", "MODE", "GRADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    first, last = (int(x) for x in args.layers.split("-"))
    layers = list(range(first, last + 1))
    if args.child:
        ckpt, mode, grads = args.child
        print(json.dumps(fit_step(Path(ckpt), mode, layers, args, Path(grads))))
        return

    ckpt = args.work / f"tinyllama-shaped-bf16-{args.model_layers}"
    if not any(ckpt.glob("*.safetensors")):
        print(f"writing the random checkpoint to {ckpt} ...", flush=True)
        in_child("--child-write", str(ckpt), str(args.model_layers))
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt_bytes / 1e9:.3f} GB; compute {args.dtype} on {args.device}; vectors at layers "
          f"{args.layers} of {args.model_layers}; {args.templates} prompts of {args.prompt} tokens, each with "
          f"{args.fields} batches of {args.suffixes} x {args.suffix} tokens after it; {args.windows} x {args.window_len} "
          f"tokens of text")
    common = ["--layers", args.layers, "--templates", str(args.templates), "--fields", str(args.fields),
              "--prompt", str(args.prompt), "--suffixes", str(args.suffixes), "--suffix",
              str(args.suffix), "--windows", str(args.windows), "--window-len", str(args.window_len), "--dtype",
              args.dtype, "--device", args.device]
    rows = []
    for mode in args.modes.split(","):
        grads = args.work / f"grads-{mode}.pt"
        record = args.work / f"step-{mode}.json"
        try:
            with open(record, "w") as out:
                peak, wall = timed_child([sys.executable, __file__, *common, "--child", str(ckpt), mode, str(grads)],
                                         stdout=out)
        except SystemExit as exc:  # killed (out of memory: the kernel's SIGKILL) or failed: a row that says so
            print(f"{mode}: {exc}", flush=True)
            rows.append((mode, None, None, None, grads))
            continue
        step = json.loads(record.read_text())
        rows.append((mode, step, wall, peak, grads))
        print(f"{mode}: step {step['seconds']:.1f} s, process peak RSS {peak / 1e9:.2f} GB", flush=True)
    reference = args.work / "grads-memory.pt"
    gpu = args.device.startswith("cuda")
    print("\n| run | step s | anonymous memory before the step GB | step's peak anonymous GB (/ checkpoint) "
          "| step's peak RSS GB | process peak RSS GB |" + (" step's peak GPU memory GB |" if gpu else "")
          + " gradients vs in memory (max rel. diff) |")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---|")
    for mode, step, wall, peak, grads in rows:
        if step is None:
            print(f"| {mode} | failed: killed (-9 is the kernel's out-of-memory kill) |" + " |" * (6 if gpu else 5))
            continue
        diff = "-" if mode == "memory" or not reference.exists() else f"{same_grads(grads, reference):.1e}"
        gpu_cell = f" {step['step_peak_gpu'] / 1e9:.2f} |" if gpu else ""
        print(f"| {mode} | {step['seconds']:.1f} | {step['anon_before'] / 1e9:.2f} | {step['step_peak_anon'] / 1e9:.2f} "
              f"({step['step_peak_anon'] / ckpt_bytes:.2f}) | {step['step_peak_rss'] / 1e9:.2f} | {peak / 1e9:.2f} "
              f"|{gpu_cell} {diff} |")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
