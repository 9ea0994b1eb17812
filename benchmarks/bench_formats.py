"""Sparse checkpoint size and load time on the bundled SmolLM2-135M, against a dense safetensors file.

For each pattern (50% unstructured per-layer magnitude, 2:4 magnitude, and 50% pruned by
multiplying with the mask as torch.nn.utils.prune does, which leaves -0.0 for every pruned
negative weight) the 210 Linear weights of the decoder layers are pruned (embeddings, norms and
the tied lm_head stay dense), then the model is written twice side by side:

* dense: ``model.save_pretrained`` (safetensors, tied weights once) -- the real file is measured
  and compared with ``SparseCheckpointInfo.dense_file_bytes`` (which is computed);
* sparse: ``prunescope.formats.save_sparse``.

Load times (best of ``--repeats``, same process, warm page cache) compare
``safetensors.torch.load_file`` of the dense file (which maps the file lazily; timed both as is
and followed by a copy of every tensor, so that all bytes are read) with ``formats.load_sparse``, and
``AutoModelForCausalLM.from_pretrained`` with ``formats.load_sparse_model``. The round trip is
checked bit for bit and the logits of one prompt compared. Run it alone:

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_formats.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from prunescope import formats, models
from prunescope.pruning.apply import apply_masks
from prunescope.pruning.masks import layer_keep_mask, nm_keep_mask
from timing import best_time


def prune_linears(model: torch.nn.Module, pattern: str) -> None:
    """Magnitude-prune every Linear in the decoder layers: ``"50%"`` per layer, ``"2:4"``, or
    ``"50%-mul"`` (50% per layer, zeroed by ``w * mask``: pruned negative weights become -0.0)."""
    layers = models.adapter_for(model).layers(model)
    prefix = models.adapter_for(model).layers_path
    masks = {}
    for name, module in layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            score = module.weight.detach().abs()  # [out, in]
            keep = nm_keep_mask(score, 2, 4) if pattern == "2:4" else layer_keep_mask(score, 0.5)
            if pattern == "50%-mul":
                with torch.no_grad():
                    module.weight.mul_(keep)
            else:
                masks[f"{prefix}.{name}"] = keep
    apply_masks(model, masks)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN and -0.0 aware)."""
    view = formats._BITS_VIEW[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(view), b.view(view))


def run_pattern(pattern: str, repeats: int, work: Path) -> list[str]:
    """Prune, save both ways, load both ways; return the Markdown table rows."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, tokenizer = models.load(models.DEFAULT_MODEL)
    prune_linears(model, pattern)
    tag = pattern.replace(":", "_").replace("%", "pct")
    dense_dir, sparse_dir = work / f"dense-{tag}", work / f"sparse-{tag}"
    t_dense_save, _ = best_time(lambda: model.save_pretrained(dense_dir), 1)
    t_sparse_save, info = best_time(lambda: formats.save_sparse(model, sparse_dir, tokenizer=tokenizer), 1)
    dense_file = dense_dir / "model.safetensors"
    real_dense = dense_file.stat().st_size

    t_load_lazy, _ = best_time(lambda: load_file(dense_file), repeats)
    t_load_dense, _ = best_time(lambda: [t.clone() for t in load_file(dense_file).values()], repeats)
    t_load_sparse, state = best_time(lambda: formats.load_sparse(sparse_dir), repeats)
    saved = model.state_dict()
    exact = all(bits_equal(saved[k], state[k]) for k in saved) and set(saved) == set(state)
    t_model_dense, _ = best_time(lambda: AutoModelForCausalLM.from_pretrained(dense_dir), repeats)
    t_model_sparse, (rebuilt, _) = best_time(lambda: formats.load_sparse_model(sparse_dir), repeats)
    ids = tokenizer("Pruning removes weights; sparse checkpoints store what is left.", return_tensors="pt").input_ids
    with torch.no_grad():
        same_logits = torch.equal(model(ids).logits, rebuilt(ids).logits)

    linear = [t for t in info.tensors if t.layout == "bitmask"]
    lin_ratio = sum(t.stored_bytes for t in linear) / sum(t.dense_bytes for t in linear)
    worst = max(t.stored_bytes / t.dense_bytes for t in linear)
    print(f"[{pattern}] computed dense bytes {info.dense_file_bytes:,}, real save_pretrained file "
          f"{real_dense:,} (difference {real_dense - info.dense_file_bytes:+d}); bit-exact {exact}; "
          f"identical logits {same_logits}")
    mb = 1e6
    return [
        f"| {pattern} | {real_dense / mb:.1f} MB | {info.file_bytes / mb:.1f} MB | {info.file_bytes / real_dense:.3f} "
        f"| {len(linear)} tensors, {lin_ratio:.4f} (worst {worst:.4f}) "
        f"| {t_sparse_save:.2f} s / {t_dense_save:.2f} s = {t_sparse_save / t_dense_save:.2f}x "
        f"| {t_load_sparse:.2f} s / {t_load_dense:.2f} s = {t_load_sparse / t_load_dense:.2f}x "
        f"(lazy mmap {t_load_lazy:.3f} s) "
        f"| {t_model_sparse:.2f} s / {t_model_dense:.2f} s = {t_model_sparse / t_model_dense:.2f}x "
        f"| {exact and same_logits} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="+", default=["50%", "2:4", "50%-mul"],
                        choices=["50%", "2:4", "50%-mul"])
    parser.add_argument("--repeats", type=int, default=3, help="load timings: best of N")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [
        "| pattern | dense file | sparse file | file ratio | pruned Linear weights: stored/dense "
        "| save: sparse / dense | load tensors: sparse / dense (copied) | load model: sparse / dense "
        "| bit-exact, same logits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        for pattern in args.patterns:
            rows += run_pattern(pattern, args.repeats, Path(tmp))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
