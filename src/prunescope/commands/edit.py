"""``prunescope edit``: change what a model prefers in a "random" table by editing hidden outputs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunescope import cli

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Measure the exact per-row distributions of a table template's fields (as 'prunescope probe'
does), build edits that move chosen fields towards a target distribution, and measure each edit
on the same footing: the target distance on the fitted rows, on held-out rewordings of the
template and on later rows; perplexity, KL and top-1 agreement against the original on unrelated
text; the change of the fields no target names. Kinds: fit (vectors added to the residual
stream, optimized on the exact distributions), units (the fit with new MLP units beside each
vector: a change that depends on the hidden state, saved by widening the MLP), gated (the fit
with each vector switched by a gate read from the hidden state: a linear classifier of the MLP's
input, trained first on the fit's tables against unrelated text, opens the vector on tables and
shuts it on text; saved as two new MLP units per layer), caa (contrastive mean difference),
ablate (a direction projected out of what the layers write), weight / weight-null (rank-one
down_proj edits writing the fitted vectors: ROME-style, and AlphaEdit-style in the null space of
unrelated keys). Writes report.json, report.md, pareto.png, cell-norms.png and, with --save, the
edited model as a plain Hugging Face folder (vectors folded into biases and weights, units and
gated vectors into a wider MLP). With --offload the weights stay on disk: each module's are read
while it runs, and the fit runs every decoder layer again in its backward pass so that it holds
one layer's weights at a time.

Example: on the bundled model, the gated fit that brings row 1's ages (tens digit uniform over
2-6) and genders (50/50) under 0.05 Jensen-Shannon distance on held-out rewordings, with
WikiText-2 perplexity within 0.01% (four seeds: 0.037-0.043; about half an hour on 2 cores):

  prunescope edit --target Age.digit1=uniform:2-6 --target Gender=Male:0.5,Female:0.5 \\
      --method gated --hold Age.digit2 --hold Age.digit3 --layers 9-13 --fit-tables 48 \\
      --fit-loss js --steps 120 --prompt-dropout 0.15 --average-last 30 --match-ppl 1,2 \\
      --eval-text WIKITEXT2_TEST.txt --out runs/gated

WIKITEXT2_TEST.txt is WikiText-2's test split as plain text (without --eval-text the perplexity is
read on the bundled text). The defaults (the vector fit, 30 steps) run in minutes and stop
farther away (README).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``edit`` subcommand."""
    parser = subparsers.add_parser(
        "edit",
        help="edit hidden outputs (steering vectors, ablated directions) or weights to move the "
        "values a model writes into random tables towards a target, and measure the side effects",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_argument(parser)
    parser.add_argument("--template", default="people", help="built-in 'people' (default) or a YAML/JSON file")
    parser.add_argument(
        "--target", action="append", default=[], metavar="FIELD=DIST",
        help="a field and its target distribution, repeatable: Gender=uniform, Age.digit1=uniform:2-6, "
        "Gender=Male:0.5,Female:0.5, Gender@1-2=uniform (rows 1-2 only), or a JSON/YAML file "
        "{FIELD: DIST or {value: probability}}",
    )
    parser.add_argument("--method", default="fit", metavar="KIND[,KIND]",
                        help="kinds of edit, comma-separated: fit (default), units, gated, caa, ablate, weight, "
                        "weight-null, or 'all'")
    parser.add_argument("--layers", default=None,
                        help="decoder layers edited, e.g. 8-12 or 8,10 (default: a block a quarter of the way in)")
    parser.add_argument("--strength", default=None, metavar="S[,S]",
                        help="edit strengths, comma-separated (default per kind: fit, units and gated 0.5,1; caa "
                        "0.05,0.2; ablate 1,2; weight 1): fit, gated and weight: the fitted vectors' multiplier; "
                        "units: what the fitted units write, multiplied; caa: the added vector's norm as a fraction "
                        "of the layer's median residual norm; ablate: the fraction of the direction removed (2 "
                        "reflects it)")
    parser.add_argument("--match-ppl", default=None, metavar="PCT[,PCT]",
                        help="for each kind, find the strengths that raise perplexity on the evaluation text by "
                        "these percentages (doubling, then bisection on perplexity alone) and measure the edit "
                        "there: the kinds compared at matched side effects, e.g. 1,2. Without --strength only "
                        "these strengths are measured. gated stops at its fitted strength (1): where that stays "
                        "under a goal it is measured there, marked not matched")
    parser.add_argument("--rows", type=int, default=1, help="rows the edit is fitted on (default 1)")
    parser.add_argument("--measure-rows", type=int, default=2,
                        help="rows written when measuring; those after --rows show generalization (default 2)")
    parser.add_argument("--fit-tables", type=int, default=16,
                        help="tables whose contexts every edit is built from, spread evenly over the fit templates "
                        "(default 16)")
    parser.add_argument("--fit-rewordings", type=int, default=None, metavar="K",
                        help="also fit on the first K rewordings the built-in template ships for fitting (people: "
                        "6; never the held-out ones): the fit's target term is then the mean over the templates, "
                        "fitting the wordings together rather than one prompt (default: all it ships; 0: the "
                        "template only)")
    parser.add_argument("--fit-template", type=Path, action="append", default=[], metavar="FILE",
                        help="a reworded template to fit on as well (repeatable; same columns as --template)")
    parser.add_argument("--measure-tables", type=int, default=32, help="tables per measurement (default 32)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the fit (default 30)")
    parser.add_argument("--refresh-every", type=int, default=10,
                        help="re-record the fit's contexts from tables the edited model writes every this many "
                        "steps (default 10; with --reweight also sooner, once the importance weights leave fewer "
                        "than half the tables effective): the edit also changes the cells before the targeted ones")
    parser.add_argument("--reweight", action="store_true",
                        help="between refreshes, weight each recorded context by how much more likely the edit so "
                        "far makes it than the edit that wrote it (importance weights: the fitted marginal is then "
                        "the edited model's own). Off by default: on the bundled model it cost more agreement on "
                        "unrelated text at the same perplexity and came no closer on held-out templates")
    parser.add_argument("--lr", type=float, default=0.03,
                        help="fit step size as a fraction of the layer's residual norm (default 0.03)")
    parser.add_argument("--lr-final", type=float, default=1.0, metavar="F",
                        help="the fit's step size at its last step as a fraction of --lr, reached by a cosine "
                        "decay (default 1: constant; on the bundled model 0.1 came no closer on held-out "
                        "templates at the same perplexity, even with twice the --steps)")
    parser.add_argument("--fit-loss", choices=("kl", "js"), default="kl",
                        help="the fit's target term per field: kl (default), KL(target || model); js, the "
                        "Jensen-Shannon distance the report measures (each field's gradient grows as it closes "
                        "in: a lone share m on values the target excludes reads sqrt(m/2), where the KL sees m)")
    parser.add_argument("--template-power", type=float, default=1.0, metavar="P",
                        help="how the fit combines its templates' target terms (the template and its fit "
                        "rewordings): their power mean with exponent P, a finite number >= 1 (default 1: the "
                        "mean; larger weighs the wordings the edit fits worst more, towards fitting the worst "
                        "alone)")
    parser.add_argument("--prompt-dropout", type=float, default=0.0, metavar="F",
                        help="leave each of the instruction's tokens out of every fit template's prompt with "
                        "probability F, drawn anew at each fit step (the chat markup and the table header "
                        "kept): the edit is fitted after many thinned variants of each wording instead of its "
                        "exact words (default 0: the prompts as written)")
    parser.add_argument("--prompt-dropout-unit", choices=("token", "word"), default="token",
                        help="what --prompt-dropout leaves out: each token (default) or each word, its tokens "
                        "together (a token alone can split a word: 'markdown' -> 'mark')")
    parser.add_argument("--average-last", type=int, default=1, metavar="K",
                        help="keep the mean of the fitted vectors after each of the last K steps, 1 to --steps "
                        "(default 1: the last step's), so the edit does not carry the last step's noise (new "
                        "tables every --refresh-every steps, new thinnings with --prompt-dropout)")
    parser.add_argument("--kl-weight", type=float, default=10.0,
                        help="weight of KL(original || edited) on unrelated text in the fit (default 10)")
    parser.add_argument("--kl-windows", type=int, default=8, metavar="N",
                        help="windows of unrelated text (128 tokens each, 1-64) the fit's KL term runs on, 8 per "
                        "step in turn (default 8: the same 8 every step; fewer: all of them every step). More "
                        "show a fit more of the text at the same cost per step (on the bundled model 64 kept "
                        "more agreement on unrelated text and came no closer to the targets)")
    parser.add_argument("--max-norm", type=float, default=0.5,
                        help="bound on each fitted vector's norm, as a fraction of the layer's median residual "
                        "norm (default 0.5)")
    parser.add_argument("--hold", action="append", default=[], metavar="FIELD",
                        help="a field the fit keeps at the unedited model's own distribution, repeatable (e.g. "
                        "--hold Age.digit2): a term of the fit like a target's, whose target is what the unedited "
                        "model writes there on the fit's tables: a side-effect term inside the table, where a gated "
                        "edit's cost lies. For the fitted kinds (fit, units, gated); not counted in the target JS")
    parser.add_argument("--gate-negative", action="append", default=[], metavar="TEMPLATE",
                        help="for the gated kind: another table (a template file, or a built-in template's name, "
                        "with other columns; repeatable) whose positions the gates learn to stay shut on beside the "
                        "fit's text; each such table weighs as much as all the text in the classifier. Without one "
                        "a gate reads 'a table', and the edit reaches other tables too (e.g. "
                        "experiments/templates/products.yaml)")
    parser.add_argument("--units", type=int, default=8, metavar="K",
                        help="new MLP units per edited layer for the 'units' kind (default 8), fitted beside each "
                        "layer's vector with the same loss as 'fit': each computes act(gate . x) * (up . x) from the "
                        "MLP's input like the layer's own units; --save widens every layer's MLP by K (zeros where "
                        "not edited). "
                        "Gated MLPs with separate gate and up projections only (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--heldout", type=Path, action="append", default=[], metavar="FILE",
                        help="a reworded template for the generalization check (repeatable; the built-in "
                        "'people' has its own)")
    parser.add_argument("--eval-text", default="default",
                        help="unrelated text: perplexity on its first --eval-tokens tokens; from the rest, the "
                        "fit's KL windows and, apart from them, the windows of the KL / top-1 side effects. "
                        "'default' (pydoc_data), a file, or "
                        "hf:NAME[:CONFIG][:SPLIT] (hf:wikitext:wikitext-2-raw-v1:test for the papers' protocol)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of the evaluation text (default 8192)")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="window length for perplexity (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tables and windows (default 0)")
    parser.add_argument("--save", action="store_true",
                        help="write the edited model (the first kind at its last strength, the matched one with "
                        "--match-ppl) to OUT/model")
    cli.add_offload_arguments(parser)
    cli.add_output_arguments(parser)
    parser.set_defaults(func=run)


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    from prunescope.errors import PrunescopeError

    if text is None:
        return None
    try:
        return tuple(float(v) for v in cli.comma_names(text))
    except ValueError:
        raise PrunescopeError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.5,1") from None


def _config(args: argparse.Namespace):
    from prunescope.edit.job import KINDS, EditConfig

    kinds = KINDS if args.method.strip() == "all" else cli.comma_names(args.method)
    return EditConfig(
        model=args.model, template=args.template, targets=tuple(args.target), kinds=tuple(kinds),
        strengths=_floats(args.strength, "--strength"), rows=args.rows, measure_rows=args.measure_rows,
        fit_tables=args.fit_tables, measure_tables=args.measure_tables, steps=args.steps,
        refresh_every=args.refresh_every, reweight=args.reweight, lr=args.lr, lr_final=args.lr_final,
        fit_loss=args.fit_loss, template_power=args.template_power,
        prompt_dropout=args.prompt_dropout, prompt_dropout_unit=args.prompt_dropout_unit,
        average_last=args.average_last,
        kl_weight=args.kl_weight, max_norm=args.max_norm, units=args.units,
        kl_windows=args.kl_windows, holds=tuple(args.hold), gate_negatives=tuple(args.gate_negative),
        match_ppl=_floats(args.match_ppl, "--match-ppl") or (), heldout=tuple(args.heldout),
        fit_rewordings=args.fit_rewordings, fit_template_files=tuple(args.fit_template),
        eval_text=args.eval_text, eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen, seed=args.seed,
        **cli.placement_options(args),
    )


def run(args: argparse.Namespace) -> int:
    """Validate, measure, edit, measure, and write the report (and the edited model)."""
    import dataclasses

    from prunescope.edit import job
    from prunescope.errors import PrunescopeError
    from prunescope.probe.run import load_for_probe
    from prunescope.report import write_json, write_text
    from prunescope.report.edit import plot_cell_norms, plot_pareto, render_markdown

    config = _config(args)
    if args.save and config.offload:
        raise PrunescopeError("--save with --offload: folding the edit writes the whole model, which --offload keeps "
                              "on disk; measure with --offload, then save without it on a machine that holds the model")
    job.check_inputs(config)  # every input checked before the model loads
    if args.layers is not None:
        config = dataclasses.replace(config, layers=job.parse_layers(args.layers, _layer_count(config.model)))
    out = cli.prepare_output_dir(args.out, "edit", args.overwrite)
    model, tokenizer = load_for_probe(config.model, config)
    if args.save:
        job.check_save(model, config.kinds[0])
    built: dict = {}
    report = job.run_edit_on(model, tokenizer, config, built=built)
    write_json(report, out / "report.json")
    write_text(render_markdown(report), out / "report.md")
    plot_pareto(report, out / "pareto.png")
    if report.cell_norms:
        plot_cell_norms(report.cell_norms, out / "cell-norms.png")
    _log_summary(report)
    if args.save:
        kind = config.kinds[0]
        strength = [s for k, s in built if k == kind][-1]  # the last measured: the matched one with --match-ppl
        diff = job.save_edited(model, tokenizer, built[(kind, strength)], out / "model")
        log.info("edited model (%s x%g, folded) in %s; reloaded, its logits differ from the hooked "
                 "model's by at most %.2e", kind, strength, out / "model", diff)
    log.info("report in %s", out)
    return 0


def _layer_count(model: str) -> int:
    """Decoder layers of ``model`` from its config alone (no weights loaded)."""
    from prunescope import models

    config = models.checked_config(models.resolve(model))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    from prunescope.errors import PrunescopeError

    raise PrunescopeError(f"the config of {model} names no layer count; cannot check --layers")


def _log_summary(report) -> None:
    for r in report.results:
        log.info("%s", r.line())
