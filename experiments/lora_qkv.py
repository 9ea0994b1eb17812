"""Does LoRA put sharper (lower effective rank) updates on v_proj than on q_proj and k_proj?

Fine-tunes LoRA r=64 on q_proj, k_proj and v_proj of the bundled SmolLM2-135M-Instruct on
WikiText-2 (valid split for training, test split for evaluation) for a few hundred steps on CPU,
with two seeds, then:

1. runs ``prunescope.lora`` spectrum analysis on both adapters (per-module effective ranks,
   plots) and pairs v_proj with q_proj / k_proj over layers, per seed and pooled over
   seeds x layers (Wilcoxon signed-rank);
2. re-compresses each adapter at kept energy 0.5..0.99 and measures parameter count and the
   perplexity of the base model with the truncated ΔW merged in.

Not part of CI. Every stage is skipped when its output already exists, so an interrupted run
resumes. Run (about 25 minutes on 2 cores)::

    flock /tmp/prunescope-heavy.lock .venv/bin/python experiments/lora_qkv.py --out experiments/out/lora_qkv

Results: OUT/summary.json, OUT/report.md, OUT/*.png (copied to docs/img/ with --img-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunescope import data, evaluate, models
from prunescope.lora.analysis import analyse_paths, paired_comparison
from prunescope.lora.compress import CompressConfig, compress_adapter
from prunescope.lora.io import load_adapter

log = logging.getLogger("lora_qkv")
WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
TARGETS = ["q_proj", "k_proj", "v_proj"]
ENERGIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _tokens(tokenizer, split: str) -> torch.Tensor:
    path = WIKITEXT / f"{split}.txt"
    text = data.load_text(path if path.is_file() else "default")
    return data.tokenize(tokenizer, text)


def _clock(hhmm: str) -> datetime:
    """Today's ``HH:MM`` in UTC."""
    hour, minute = (int(v) for v in hhmm.split(":"))
    return datetime.now(timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)


def train(seed: int, args: argparse.Namespace, folder: Path) -> dict:
    """LoRA fine-tune of q/k/v with ``seed``; saves the PEFT adapter to ``folder``."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    model, tokenizer = models.load(models.DEFAULT_MODEL)
    torch.manual_seed(seed)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    windows = data.calibration_blocks(_tokens(tokenizer, "valid"), args.steps * args.batch, args.seqlen, seed=seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"train seed {seed}", mininterval=10):
        batch = windows[step * args.batch : (step + 1) * args.batch]  # [b, L]
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0:
            log.info("seed %d step %d loss %.3f", seed, step, loss.item())
        if time.perf_counter() - start > 60 * args.max_train_minutes:
            log.warning("seed %d: time budget of %.1f min reached after %d steps", seed, args.max_train_minutes, step + 1)
            break
    peft_model.save_pretrained(folder)
    info = {"seed": seed, "steps": len(losses), "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr, "losses": losses, "train_seconds": time.perf_counter() - start}
    (folder / "train.json").write_text(json.dumps(info) + "\n")
    return info


@torch.no_grad()
def merged_perplexity(model, base_state: dict, adapter_dir: Path, blocks: torch.Tensor) -> float:
    """Perplexity of the base model with ``scale * B @ A`` of every module added to its weight."""
    model.load_state_dict(base_state)
    for block in load_adapter(adapter_dir).blocks:
        weight = model.get_submodule(block.name).weight  # [out, in]
        weight += (block.scale * block.B.double() @ block.A.double()).to(weight.dtype)
    return evaluate.perplexity(model, blocks, batch_size=4, progress=False)


def curve(seed_dir: Path, model, base_state: dict, blocks: torch.Tensor) -> dict:
    """Kept energy -> parameters and perplexity, plus the untruncated adapter."""
    adapter = load_adapter(seed_dir / "adapter")
    full = {"parameters": sum(b.parameters for b in adapter.blocks),
            "ppl": merged_perplexity(model, base_state, seed_dir / "adapter", blocks)}
    points = []
    for energy in ENERGIES:
        out = seed_dir / f"compressed-{energy:.2f}"
        res = compress_adapter(adapter, CompressConfig(energy=energy), out)
        ppl = merged_perplexity(model, base_state, out, blocks)
        points.append({"energy": energy, "parameters": res.new_parameters, "ppl": ppl,
                       "mean_rank": sum(m.new_rank for m in res.modules) / len(res.modules)})
        log.info("%s energy %.2f: %d params, ppl %.3f", seed_dir.name, energy, res.new_parameters, ppl)
    return {"full": full, "points": points}


def pooled(report, seeds: list[str]) -> list[dict]:
    """v_proj vs q_proj and vs k_proj, paired over (seed, layer) and per seed."""
    eff = {(m.adapter, m.layer, m.module_type): m.effective_rank for m in report.modules}
    out = []
    for other in ("q_proj", "k_proj"):
        for scope in [seeds, *([s] for s in seeds)]:
            pairs = [(eff[(s, l, "v_proj")], eff[(s, l, other)])
                     for (s, l, t) in eff if t == "v_proj" and s in scope and (s, l, other) in eff]
            unit = "seed x layer pairs" if len(scope) > 1 else "layers"
            c = paired_comparison(pairs, "v_proj", other, adapter="+".join(scope), unit=unit)
            out.append({"scope": "+".join(scope), **{k: getattr(c, k) for k in (
                "n_pairs", "median_difference", "a_lower", "b_lower", "p_value", "sentence")}})
    return out


def plot_curve(curves: dict, base_ppl: float, path: Path) -> None:
    from prunescope.report.plots import new_figure, save_figure

    fig = new_figure(10, 4)
    ax_p, ax_q = fig.subplots(1, 2)
    for seed, c in curves.items():
        e = [p["energy"] for p in c["points"]]
        ax_p.plot(e, [p["parameters"] / 1e6 for p in c["points"]], "o-", label=seed)
        ax_q.plot(e, [p["ppl"] for p in c["points"]], "o-", label=f"{seed} truncated")
        ax_q.axhline(c["full"]["ppl"], ls="--", lw=1, color=ax_q.lines[-1].get_color(), label=f"{seed} full r=64")
    ax_q.axhline(base_ppl, color="k", lw=1, label="base model")
    ax_p.set(xlabel="kept energy", ylabel="LoRA parameters (M)", title="parameters after re-compression")
    ax_q.set(xlabel="kept energy", ylabel="perplexity (WikiText-2 test, 16 x 256)", title="perplexity")
    ax_p.legend(), ax_q.legend(fontsize=7)
    save_figure(fig, path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/lora_qkv"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-train-minutes", type=float, default=float("inf"),
                        help="stop training a seed after this many minutes (CPU time is shared)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=128)
    parser.add_argument("--finish-by", default=None, metavar="HH:MM",
                        help="UTC time by which everything should be done: splits the time left between seeds")
    parser.add_argument("--reserve-minutes", type=float, default=6.0,
                        help="with --finish-by: minutes kept for the compression curve and the analysis")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--img-dir", type=Path, default=None, help="also copy the PNGs here (docs/img)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [f"seed{s}" for s in args.seeds]
    todo = [s for s in args.seeds if not (args.out / f"seed{s}" / "adapter" / "adapter_model.safetensors").is_file()]
    for i, s in enumerate(todo):
        if args.finish_by:
            left = (_clock(args.finish_by) - datetime.now(timezone.utc)).total_seconds() - 60 * args.reserve_minutes
            args.max_train_minutes = min(args.max_train_minutes, max(1.0, left / 60 / (len(todo) - i)))
            log.info("seed %d: training budget %.1f min (finish by %s UTC)", s, args.max_train_minutes, args.finish_by)
        train(s, args, args.out / f"seed{s}" / "adapter")
    curves_path = args.out / "curves.json"
    if not curves_path.is_file():
        model, tokenizer = models.load(models.DEFAULT_MODEL)
        blocks = data.eval_blocks(_tokens(tokenizer, "test"), args.eval_seqlen, args.eval_windows * args.eval_seqlen)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        base_ppl = evaluate.perplexity(model, blocks, progress=False)
        curves = {s: curve(args.out / s, model, base_state, blocks) for s in seeds}
        curves_path.write_text(json.dumps({"base_ppl": base_ppl, "curves": curves}, indent=2) + "\n")
    analyse(args, seeds, json.loads(curves_path.read_text()))


def analyse(args: argparse.Namespace, seeds: list[str], curves: dict) -> None:
    """Spectrum report of the trained adapters, pooled comparisons and the compression plot."""
    from prunescope.report import write_json, write_text
    from prunescope.report.lora import plot_effective_rank_heatmap, plot_spectra, render_spectrum_markdown

    report_dir = args.out / "spectrum"
    links = report_dir / "adapters"
    links.mkdir(parents=True, exist_ok=True)
    for s in seeds:  # label each adapter by its seed
        target = links / s
        if not target.exists():
            shutil.copytree(args.out / s / "adapter", target)
    report = analyse_paths([links / s for s in seeds])
    write_json(report, report_dir / "report.json")
    write_text(render_spectrum_markdown(report), report_dir / "report.md")
    pngs = [plot_spectra(report, args.out / "lora_qkv_spectra.png"),
            plot_effective_rank_heatmap(report, args.out / "lora_qkv_effective_rank.png")]
    plot_curve(curves["curves"], curves["base_ppl"], args.out / "lora_qkv_compression.png")
    pngs.append(args.out / "lora_qkv_compression.png")
    summary = {"comparisons": pooled(report, seeds), **curves,
               "median_effective_rank": {f"{t.adapter}/{t.module_type}": t.effective_rank_median
                                         for t in report.type_summaries},
               "train": {s: json.loads((args.out / s / "adapter" / "train.json").read_text()) for s in seeds}}
    for s in seeds:
        losses = summary["train"][s]["losses"]
        summary["train"][s] = {"first10_loss": sum(losses[:10]) / len(losses[:10]),
                               "last10_loss": sum(losses[-10:]) / len(losses[-10:]),
                               "steps": len(losses), "train_seconds": summary["train"][s]["train_seconds"]}
    write_json(summary, args.out / "summary.json")
    for c in summary["comparisons"]:
        log.info("%s: %s", c["scope"], c["sentence"])
    if args.img_dir:
        for p in pngs:
            shutil.copy(p, args.img_dir / Path(p).name)


if __name__ == "__main__":
    main()
