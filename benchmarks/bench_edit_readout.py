"""The fit's target term on the bundled model: every field of a template read from shared runs
(``prunescope.edit.fields.readout``) against each field's sequences run on their own.

A step of ``prunescope edit``'s fit reads, for each fit template, the exact distribution of every
fitted field (targets and ``--hold`` fields) after each fit table's context, with gradients.
``readout`` runs a template's sequences of every field in one teacher-forced pass after the
prompt, a sequence that is a prefix of another read from the longer one (a row's digit contexts,
a choice's drawn spelling), the shortest apart when padding would waste a quarter of the tokens,
and normalises only the positions it reads. The reference (how the fit read them before
2026-12-06) runs each field's sequences alone in one batch and normalises every position.

Both run on the same contexts (the people template with its six fit rewordings, the gated
README run's fields: the age's tens digit and gender targeted, the second and third age digits
held) with the same random vectors at layers 9-13, forward and backward, alternately,
``--repeats`` times; the table gives the median seconds, the ratio, and the largest difference
of the probabilities and of the vectors' gradients. Run it alone:

    flock /tmp/prunescope-heavy.lock .venv/bin/python benchmarks/bench_edit_readout.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunescope import models
from prunescope.edit import fields, job, methods
from prunescope.edit.hooks import applied


def reference_readout(model: torch.nn.Module, contexts: fields.Contexts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each field's sequences teacher-forced on their own, every position normalised."""
    cache, start = fields.prompt_cache(model, contexts.prompt)
    out = []
    for f in contexts.fields:
        seqs = fields._sequences(f)
        logits = fields.teacher_forced(model, cache, start, seqs)[0].float()  # [B, S, V], as the old readout cast it
        whole = fields._RunLogits([torch.log_softmax(logits, dim=-1)], [(0, b) for b in range(len(seqs))])
        out.append(fields._reader(f)(whole, list(range(len(seqs))), f))
    return out


def step(model, edit, contexts, read) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """Seconds of one forward+backward of a loss on every field's probabilities."""
    vectors = [e.add for e in edit.layers]
    for v in vectors:
        v.grad = None
    start = time.perf_counter()
    with applied(model, edit):
        reads = [read(model, c) for c in contexts]
        loss = sum((p * torch.arange(p.shape[1])).sum() for r in reads for p, _d in r)
        loss.backward()
    seconds = time.perf_counter() - start
    return seconds, [p.detach() for r in reads for p, _d in r], [v.grad.clone() for v in vectors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, nargs="+", default=[16, 48], help="--fit-tables values")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = models.load("smollm2-135m", device="cpu", dtype="float32")
    model.requires_grad_(False)
    rows = []
    for tables in args.tables:
        config = job.EditConfig(targets=("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5"), kinds=("fit",),
                                holds=("Age.digit2", "Age.digit3"), fit_tables=tables, layers=(9, 10, 11, 12, 13))
        setting = job.new_setting(config, tokenizer)
        contexts = job.record_fit_contexts(model, tokenizer, config, setting, 0)
        edit, _groups = methods._vector_params(model, config.layers, 0.03, {i: 1.0 for i in config.layers})
        for e in edit.layers:
            e.add.data.normal_(0, 0.3)
        times: dict[str, list[float]] = {"reference": [], "shared": []}
        for _ in range(args.repeats):
            t_ref, p_ref, g_ref = step(model, edit, contexts, reference_readout)
            t_new, p_new, g_new = step(model, edit, contexts, fields.readout)
            times["reference"].append(t_ref)
            times["shared"].append(t_new)
        dp = max(float((a - b).abs().max()) for a, b in zip(p_ref, p_new))
        dg = max(float((a - b).norm() / a.norm()) for a, b in zip(g_ref, g_new))
        ref, new = statistics.median(times["reference"]), statistics.median(times["shared"])
        rows.append(f"| {tables} over {len(setting.fitted_on)} wordings | {ref:.2f} | {new:.2f} | {ref / new:.2f}x "
                    f"| {dp:.1e} | {dg:.1e} |")
        print(rows[-1], flush=True)
    print("| fit tables | each field alone s | shared runs s | ratio | max prob. diff | max grad rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
