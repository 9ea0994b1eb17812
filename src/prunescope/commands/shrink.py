"""``prunescope shrink``: remove MLP channels, attention heads and layers; save a smaller HF model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prunescope import cli

if TYPE_CHECKING:
    from prunescope.pruning.shrink import ShrinkConfig

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Structured pruning that makes a model really smaller and faster: remove a fraction of every
layer's MLP channels (--mlp), whole KV groups (--kv-groups: a key/value head with its query
heads) or query heads from every group (--heads-per-group), and whole decoder layers with the
lowest block influence (--drop-layers). Units are scored by --criterion (flap: input variance x
squared weight column; wanda-sp: |W| x input norm; magnitude: no data), and the projection that
reads them is repaired by --compensation (lstsq: least-squares refit of down_proj/o_proj on the
kept channels; bias: their mean contribution as a bias; none). Layers are pruned one after the
other on calibration text, each seeing the already pruned layers before it.

Writes OUT/report.json, report.md, summary.png, layers.png and OUT/model/, an ordinary Hugging
Face folder that AutoModelForCausalLM.from_pretrained loads without prunescope. Families:
Llama, Mistral, Qwen2, Qwen3, Phi-3 (heads, channels, layers); OPT and GPT-2 (channels, layers).
With no size option: --mlp 0.25.

A model larger than memory (--offload, automatic when a local safetensors model does not fit):
one decoder layer is read from disk, shrunk and written to OUT/model at a time; latency is then
not measured and --recover-steps is refused."""


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to remove (uniform over layers)")
    group.add_argument("--mlp", type=float, default=None, metavar="F",
                       help="fraction of each layer's MLP channels to remove, e.g. 0.25 (default 0.25 "
                       "when no other size is given)")
    group.add_argument("--kv-groups", type=int, default=0, metavar="K",
                       help="KV groups (a key/value head and its query heads) to remove per layer")
    group.add_argument("--heads-per-group", type=int, default=0, metavar="H",
                       help="query heads to remove from every kept KV group")
    group.add_argument("--drop-layers", type=int, default=0, metavar="N",
                       help="whole decoder layers to remove (lowest block influence, as in ShortGPT)")
    group.add_argument("--target-params", type=float, default=None, metavar="F",
                       help="instead of --mlp: keep at most this fraction of the decoder-layer "
                       "parameters, solving for the MLP width given --kv-groups/--drop-layers")
    group.add_argument("--multiple-of", type=int, default=64, metavar="M",
                       help="round the kept MLP width to a multiple of M so kernels stay fast (default 64)")


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how to choose and repair")
    group.add_argument("--criterion", default="flap", help="flap (default), wanda-sp or magnitude")
    group.add_argument("--compensation", default="lstsq",
                       help="lstsq (default; no config change), bias (adds down_proj/o_proj biases "
                       "where the family's config has the flag) or none")
    group.add_argument("--damp", type=float, default=0.01,
                       help="ridge of the lstsq refit toward the original weights, as a fraction of each kept "
                       "channel's own input energy (default 0.01)")


def _add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("measurement, recovery, output")
    group.add_argument("--latency-rounds", type=int, default=3,
                       help="interleaved rounds of dense/shrunk latency (default 3; 0 skips it and the dense copy)")
    group.add_argument("--prefill-tokens", type=int, default=512, help="prefill length for latency (default 512)")
    group.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens for decode speed (default 64)")
    group.add_argument("--recover-steps", type=int, default=0,
                       help="distil the shrunk model toward the dense one for N steps (KL; default 0 = off)")
    group.add_argument("--recover-mode", default="lora", help="lora (default; merged after) or full")
    group.add_argument("--recover-lr", type=float, default=None, help="learning rate (default 5e-4 lora, 2e-5 full)")
    group.add_argument("--recover-rank", type=int, default=8, help="LoRA rank (default 8)")
    group.add_argument("--recover-seqlen", type=int, default=256, help="tokens per recovery window (default 256)")
    group.add_argument("--recover-batch", type=int, default=4, help="windows per recovery step (default 4)")
    group.add_argument("--no-save", action="store_true", help="do not write OUT/model")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``shrink`` subcommand."""
    parser = subparsers.add_parser(
        "shrink", help="remove channels, heads and layers: a smaller, faster HF model",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_argument(parser)
    cli.add_offload_arguments(parser, automatic=True)
    _add_size_arguments(parser)
    _add_method_arguments(parser)
    cli.add_text_arguments(parser)
    _add_measure_arguments(parser)
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace, out: Path) -> "ShrinkConfig":
    """The validated job config from the parsed options."""
    from prunescope.pruning.shrink import ShrinkConfig

    return ShrinkConfig(
        model=args.model, mlp=args.mlp, kv_groups=args.kv_groups, heads_per_group=args.heads_per_group,
        drop_layers=args.drop_layers, target_params=args.target_params, criterion=args.criterion,
        compensation=args.compensation, multiple_of=args.multiple_of, damp=args.damp,
        latency_rounds=args.latency_rounds, prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens, recover_steps=args.recover_steps,
        recover_mode=args.recover_mode, recover_lr=args.recover_lr, recover_rank=args.recover_rank,
        recover_seqlen=args.recover_seqlen, recover_batch_size=args.recover_batch,
        save_dir=None if args.no_save else out / "model",
        **cli.text_options(args), **cli.placement_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """Validate, shrink, and write the report files; nothing is written before the plan holds."""
    from prunescope import distributed
    from prunescope.pruning.shrink import run_shrink
    from prunescope.report import write_json, write_text
    from prunescope.report.shrink import layer_table, plot_layers, render_markdown, save_summary

    out = cli.check_output_dir(args.out, "shrink", args.overwrite)
    result, _model = run_shrink(_config(args, out))
    if not distributed.is_main():
        return 0  # process 0 writes
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "report.json")
    write_text(render_markdown(result), out / "report.md")
    save_summary(result, out / "summary.png")
    plot_layers(result, out / "layers.png")
    log.info("per layer:\n%s", layer_table(result))
    lat = result.latency
    log.info(
        "%s: parameters %.1fM -> %.1fM, perplexity %s -> %s%s; report in %s",
        result.model, result.dense_params / 1e6, result.shrunk_params / 1e6,
        f"{result.dense_ppl:.3f}" if result.dense_ppl else "n/a",
        f"{result.pruned_ppl:.3f}" if result.pruned_ppl else "n/a",
        f", prefill {lat.prefill_speedup:.2f}x and decode {lat.decode_speedup:.2f}x the dense speed" if lat else "",
        out,
    )
    if result.saved:
        log.info("load it anywhere: AutoModelForCausalLM.from_pretrained(%r)", result.saved["path"])
    return 0
