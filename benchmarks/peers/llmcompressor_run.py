"""Prune a local Hugging Face model with the peer tool llm-compressor (Wanda / SparseGPT).

Run it with the peer venv's python, never prunescope's (it must not import prunescope)::

    PY=$(bash benchmarks/peers/llmcompressor_env.sh)
    $PY benchmarks/peers/llmcompressor_run.py --model DIR --windows calib.pt \\
        --method wanda --sparsity 0.5 --save OUT_DIR --json OUT.json

The calibration windows are a torch-saved LongTensor [n, seqlen] of token ids, the same
ones prunescope is given, passed to ``oneshot`` as an already tokenized
``datasets.Dataset`` (columns ``input_ids`` and ``attention_mask``) with
``num_calibration_samples = n``, ``max_seq_length = seqlen`` and no shuffling, so
nothing is re-tokenized, dropped or reordered.

Pruned layers: every Linear inside the decoder layers, never ``lm_head`` -- the same set
prunescope prunes.  llm-compressor's own default (``targets=["Linear"]``, ``ignore=[]``)
would also prune ``lm_head``; here the modifiers get ``targets`` = the decoder-layer
class(es) (``model._no_split_modules``, which is also what its sequential pipeline
splits on), and inside each target llm-compressor prunes every Linear/Conv it finds.

The pruned model is saved as a plain dense HF folder (safetensors, no compressed-tensors
``quantization_config``), loadable by plain transformers.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import resource
import sys
import time
from pathlib import Path


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model folder (safetensors)")
    p.add_argument(
        "--windows",
        required=True,
        help="torch-saved LongTensor [n, seqlen] of token ids",
    )
    p.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="target sparsity (ignored by llm-compressor for N:M masks, which fix it to N/M)",
    )
    p.add_argument(
        "--mask-structure",
        default="0:0",
        choices=("0:0", "2:4"),
        help="0:0 = unstructured, 2:4 = two zeros in every four inputs",
    )
    p.add_argument(
        "--owl",
        action="store_true",
        help="OWL per-layer sparsities (modifier sparsity_profile='owl')",
    )
    p.add_argument(
        "--owl-m",
        type=float,
        default=5.0,
        help="OWL outlier threshold M (paper default 5)",
    )
    p.add_argument(
        "--owl-lmbda",
        type=float,
        default=0.08,
        help="OWL lambda, max deviation from the mean sparsity (paper default 0.08)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--pipeline",
        choices=("sequential", "basic"),
        default="sequential",
        help="sequential (llm-compressor's default for pruning: layer by layer, "
        "pruned outputs feed the next layer) or basic (whole-model forwards, "
        "every layer calibrated on dense activations)",
    )
    p.add_argument(
        "--sequential",
        dest="pipeline",
        action="store_const",
        const="sequential",
        help="shorthand for --pipeline sequential",
    )
    p.add_argument(
        "--sequential-targets",
        nargs="+",
        default=None,
        help="decoder-layer class names (default: model._no_split_modules)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=128,
        help="SparseGPT columns per block (its default 128)",
    )
    p.add_argument(
        "--dampening",
        type=float,
        default=0.01,
        help="SparseGPT dampening, fraction of mean diag(H) (its default 0.01)",
    )
    p.add_argument(
        "--save", default=None, help="write the pruned model here as a dense HF folder"
    )
    p.add_argument(
        "--json", default=None, help="write timing/memory/sparsity record here"
    )
    return p.parse_args(argv)


class _NoProcessor:
    """Stands in for a tokenizer when the model folder has none.

    ``oneshot`` insists on building a processor whenever a dataset is given, but with an
    already tokenized dataset and the default truncation collator it never uses it.
    """

    def save_pretrained(self, *_a, **_k):
        """Never called: oneshot runs with output_dir=None."""


def _decoder_layer_classes(model, explicit):
    if explicit:
        return list(explicit)
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        sys.exit(
            "model has no _no_split_modules; pass --sequential-targets DecoderLayerClass"
        )
    return names


def _decoder_linears(model, layer_classes):
    """(name, Linear) for every Linear inside a decoder layer."""
    import torch

    out = []
    for lname, layer in model.named_modules():
        if type(layer).__name__ in layer_classes:
            for n, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    out.append((f"{lname}.{n}", m))
    return out


def _sparsity_report(model, layer_classes):
    zeros = total = 0
    per_module = {}
    for name, m in _decoder_linears(model, layer_classes):
        w = m.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_module[name] = z / w.numel()
    return (zeros / total if total else float("nan")), per_module


def _nm_ok(model, layer_classes, n=2, m=4):
    """True when every group of m consecutive inputs of every row has >= n zeros."""
    for _, lin in _decoder_linears(model, layer_classes):
        w = lin.weight.detach()
        if w.shape[1] % m:
            return False
        if not bool(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) >= n).all()):
            return False
    return True


def main(argv=None):
    args = _parse_args(argv)
    # llm-compressor logs to stdout; send everything to stderr so that stdout carries
    # only the JSON record.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        text = _run(args)
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    print(text)
    return 0


def _run(args):
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.owl and args.mask_structure != "0:0":
        print(
            "warning: --owl with an N:M mask: llm-compressor ignores the sparsity (and so the "
            "OWL profile) for N:M masks",
            file=sys.stderr,
        )

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    layer_classes = _decoder_layer_classes(model, args.sequential_targets)

    windows = torch.load(args.windows)
    if not (isinstance(windows, torch.Tensor) and windows.dim() == 2):
        sys.exit(
            f"--windows must hold a 2-D LongTensor [n, seqlen], got {type(windows)}"
        )
    windows = windows.long()
    n, seqlen = windows.shape
    ds = Dataset.from_dict(
        {
            "input_ids": windows.tolist(),
            "attention_mask": torch.ones_like(windows).tolist(),
        }
    )

    try:
        processor = AutoTokenizer.from_pretrained(args.model)
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
    ):  # no tokenizer: fine, data is tokenized
        processor = _NoProcessor()

    common = {
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "targets": layer_classes,
        "ignore": [],
    }
    if args.owl:
        common.update(
            sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lmbda
        )
    if args.method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        modifier = SparseGPTModifier(
            block_size=args.block_size, dampening_frac=args.dampening, **common
        )

    owl_sparsities = None
    if args.owl:
        owl_sparsities = _patch_owl()

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=processor,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=args.pipeline,
        sequential_targets=layer_classes,
        output_dir=None,
    )
    seconds = time.perf_counter() - t0

    actual, per_module = _sparsity_report(model, layer_classes)

    if args.save:
        save = Path(args.save)
        save.mkdir(parents=True, exist_ok=True)
        # oneshot wrapped model.save_pretrained (compressed-tensors format); call the
        # class's own method to write a plain dense HF folder instead.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        type(model).save_pretrained(model, str(save))
        if not isinstance(processor, _NoProcessor):
            processor.save_pretrained(str(save))

    record = {
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "llmcompressor_version": getattr(llmcompressor, "__version__", None)
        or md.version("llmcompressor"),
        "torch_version": torch.__version__,
        "transformers_version": md.version("transformers"),
        "method": args.method,
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "owl": bool(args.owl),
        "owl_m": args.owl_m if args.owl else None,
        "owl_lmbda": args.owl_lmbda if args.owl else None,
        "owl_layer_sparsities": owl_sparsities or None,
        "owl_patched": bool(args.owl),
        "pipeline": args.pipeline,
        "dtype": args.dtype,
        "n_windows": n,
        "seqlen": seqlen,
        "targets": layer_classes,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "dampening_frac": args.dampening if args.method == "sparsegpt" else None,
        "actual_sparsity": actual,
        "actual_sparsity_min_module": min(per_module.values()) if per_module else None,
        "actual_sparsity_max_module": max(per_module.values()) if per_module else None,
        "n_pruned_modules": len(per_module),
        "nm_2_4_ok": _nm_ok(model, layer_classes)
        if args.mask_structure == "2:4"
        else None,
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(record, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return text


def _patch_owl():
    """Make llm-compressor's own OWL profile run (0.14.0.1; see README).

    Two defects stop ``sparsity_profile="owl"`` as shipped:

    1. ``SparsityModifierBase._get_activations`` gathers its activation norms with
       ``llmcompressor.pipelines.basic.run_calibration``, which fires the
       calibration-start/-end lifecycle events; it is called from ``on_initialize``,
       before the session is initialized, so oneshot dies with
       "ValueError: Cannot invoke event before initializing".
    2. ``_infer_owl_layer_sparsity`` returns a dict {decoder-layer name: sparsity}, but
       ``on_calibration_start`` only indexes a *list* per target layer and otherwise
       hands the whole dict on as one number.

    The patch keeps llm-compressor's OWL math untouched: while the profile is inferred,
    ``run_calibration`` is swapped for the same forward loop minus the lifecycle events
    (``calibration_forward_context`` + ``model(**batch)``, as in BasicPipeline), and the
    dict is handed on as a list in target-layer order (targets are the decoder layers
    here, the same layers OWL groups by).  Returns a dict filled with the per-layer
    sparsities once they are known.
    """
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from llmcompressor.pipelines import basic

    seen: dict = {}
    original = SparsityModifierBase._infer_owl_layer_sparsity

    def plain_calibration(model, dataloader):
        from compressed_tensors.offload import get_execution_device
        from llmcompressor.pytorch.utils.helpers import tensors_to_device
        from llmcompressor.utils import calibration_forward_context

        device = get_execution_device(model)
        with calibration_forward_context(model):
            for batch in dataloader:
                model(**tensors_to_device(batch, device))

    def infer(self, model, layers, dataloader):
        saved = basic.run_calibration
        basic.run_calibration = plain_calibration
        try:
            result = original(self, model, layers, dataloader)
        finally:
            basic.run_calibration = saved
        if isinstance(result, dict):
            seen.update({k: float(v) for k, v in result.items()})
            names = list(self._target_layers)
            if set(names) != set(result):
                raise RuntimeError(
                    f"OWL groups {sorted(result)} differ from target layers {sorted(names)}"
                )
            return [float(result[k]) for k in names]
        return result

    SparsityModifierBase._infer_owl_layer_sparsity = infer
    return seen


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
