"""Differentiable exact field distributions: what ``prunescope edit --method fit`` optimizes.

The probe measures, for a field at row ``r`` (a choice cell, or one digit position of a digits
cell), the marginal ``E_table[p(value | context of the cell in that table)]`` renormalised over
the allowed values, reading ``p`` from the logits while it writes tables. Fitting an edit needs
the same number with gradients. So the contexts are recorded once, from tables written by the
unedited model (:func:`record_contexts`), and each step replays them teacher-forced
(:func:`marginals`):

* the prompt shared by every table runs once, its KV cache (with its autograd graph) repeated
  over the tables, and only each table's own suffix (the cells written before the field) plus
  the value's tokens run per table: a few dozen tokens per table, not the whole prompt;
* ``choice``: ``p(option) = sum over spellings s of p(s) * p(a token that ends the cell | s)``,
  the probe's :func:`prunescope.probe.exact.spelled_choice_probs`, here differentiable;
* ``digits`` position ``k``: the next-token probabilities of the ten digit tokens after the
  digit lead and the ``k - 1`` digits that table wrote (tables that wrote something else there
  drop out, as in the probe).

Contexts are recorded from tables a model wrote (the unedited one first; ``prunescope edit``
re-records them with the edit so far every few steps, since the edit also changes the earlier
cells of a row); the measurement afterwards (the probe on the edited model) writes its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunescope import models
from prunescope.edit.targets import FieldKey, Target
from prunescope.errors import PrunescopeError
from prunescope.probe.decode import Batch
from prunescope.probe.tables import Tables, Vocab, build_prompt, build_vocab, write_tables
from prunescope.probe.template import Template


@dataclass(frozen=True)
class FieldContexts:
    """Teacher-forced sequences of one targeted field at one row.

    Attributes:
        row: 1-based row.
        key: the field.
        values: the field's values (choices, or the ten digits).
        suffixes: per kept table, the tokens after the shared prompt up to the value.
        continuations: per value, the token sequences scored after a suffix (choice: the
            spellings; digits: one single-token sequence, the digit).
        closers: tokens that end a cell (choice fields: scored after each spelling), else empty.
    """

    row: int
    key: FieldKey
    values: tuple[str, ...]
    suffixes: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[tuple[int, ...], ...], ...]
    closers: torch.Tensor


@dataclass(frozen=True)
class Contexts:
    """The shared prompt and every targeted field's contexts, recorded from the unedited model."""

    prompt: tuple[int, ...]
    fields: tuple[FieldContexts, ...]


def _column_index(template: Template, name: str) -> int:
    return [c.name for c in template.columns].index(name)


@torch.no_grad()
def record_contexts(
    model: nn.Module, tokenizer, template: Template, targets: list[Target], rows: int, tables: int,
    seed: int, batch_size: int = 16, prompt_rows: int | None = None,
) -> Contexts:
    """Write ``tables`` tables of ``rows`` rows with ``model`` and keep each targeted cell's context.

    ``targets`` with ``rows=None`` apply to every row ``1..rows``. ``prompt_rows`` is the number
    of rows the instruction asks for (default ``rows``): the measurement writes more rows than
    are fitted, and the fit must see the very prompt that is measured."""
    instruction = template.instruction(prompt_rows or rows)
    prompt_text = build_prompt(tokenizer, template, rows, instruction)
    vocab = build_vocab(tokenizer, template, prompt_text)
    add = not bool(getattr(tokenizer, "chat_template", None))
    # the prompt's last token starts every suffix, so even a table's first cell has its first
    # value token predicted inside the teacher-forced pass
    shared = (list(tokenizer(prompt_text, add_special_tokens=add)["input_ids"]) + vocab.row_start)[:-1]
    wanted = {(r, _column_index(template, t.key.column)) for t in targets for r in _rows(t, rows)}
    seen: dict[tuple[int, int], list[list[int]]] = {w: [] for w in wanted}

    def on_cell(row: int, column: int, batch: Batch) -> None:
        if (row + 1, column) in seen:
            seen[(row + 1, column)].extend(h[len(shared):] for h in batch.history)

    written = write_tables(model, tokenizer, template, rows, tables, seed, exact=False, instruction=instruction,
                           batch_size=batch_size, progress=False, draws="iid", on_cell=on_cell)
    fields = []
    for t in targets:
        for r in _rows(t, rows):
            c = _column_index(template, t.key.column)
            fields.append(_field(t, r, seen[(r, c)], written, c, vocab, template))
    return Contexts(tuple(shared), tuple(fields))


def _rows(target: Target, rows: int) -> list[int]:
    return [r for r in (target.rows or range(1, rows + 1)) if r <= rows]


def _field(target: Target, row: int, suffixes: list[list[int]], written: Tables, column: int,
           vocab: Vocab, template: Template) -> FieldContexts:
    col = template.columns[column]
    if col.type == "choice":
        conts = tuple(tuple(tuple(ids) for ids in vocab.spellings[col.name][i]) for i in range(len(col.choices)))
        return FieldContexts(row, target.key, target.values, tuple(tuple(s) for s in suffixes), conts,
                             vocab.closers)
    k = target.key.position or 1
    digit_set = set(vocab.digits)
    kept = []
    for suffix, cell in zip(suffixes, written.cells[row - 1][column].tokens):
        if len(cell) >= k - 1 and all(t in digit_set for t in cell[: k - 1]):
            kept.append(tuple(suffix) + tuple(vocab.digit_lead) + tuple(cell[: k - 1]))
    if not kept:
        raise PrunescopeError(
            f"none of the {len(suffixes)} tables written for fitting reached {target.key.label} at row {row} "
            f"(each wrote fewer than {k} digits there); target an earlier digit or fit on more tables"
        )
    conts = tuple(((d,),) for d in vocab.digits)
    return FieldContexts(row, target.key, target.values, tuple(kept), conts, torch.empty(0, dtype=torch.long))


def prompt_cache(model: nn.Module, prompt: tuple[int, ...]):
    """The shared prompt's KV cache (autograd graph kept) and its length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt], device=models.input_device(model))  # [1, T0]
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, len(prompt)


def _repeated(cache, batch: int):
    """A new cache holding ``cache``'s keys and values repeated ``batch`` times (differentiably)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), index)
    return out


def teacher_forced(model: nn.Module, cache, start: int, seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[int]]:
    """Logits ``[B, S, V]`` of right-padded ``seqs`` run after the shared prompt, and their lengths.

    Right padding needs no attention mask: causal attention never lets a real token see the pads
    after it."""
    length = max(len(s) for s in seqs)
    padded = [list(s) + [s[-1]] * (length - len(s)) for s in seqs]
    ids = torch.tensor(padded, device=models.input_device(model))  # [B, S]
    positions = start + torch.arange(length, device=ids.device).expand(len(seqs), -1)  # [B, S]
    mask = torch.ones(len(seqs), start + length, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=_repeated(cache, len(seqs)),
                use_cache=True)
    return out.logits.float(), [len(s) for s in seqs]


def _choice_probs(model: nn.Module, cache, start: int, field: FieldContexts) -> torch.Tensor:
    """``[tables, options]`` probability of each option in each table (any spelling, then a closer)."""
    seqs, owners = [], []
    for t, suffix in enumerate(field.suffixes):
        for c, spellings in enumerate(field.continuations):
            for spelling in spellings:
                seqs.append(suffix + spelling)
                owners.append((t, c, len(spelling)))
    logits, lengths = teacher_forced(model, cache, start, seqs)
    logp = torch.log_softmax(logits, dim=-1)  # [B, S, V]
    probs = torch.zeros(len(field.suffixes), len(field.continuations), dtype=logp.dtype, device=logp.device)
    for b, ((t, c, n), seq, length) in enumerate(zip(owners, seqs, lengths)):
        first = length - n  # index of the spelling's first token, predicted by the token before it
        ids = torch.tensor(seq[first:length], device=logp.device)  # [n]
        score = logp[b, first - 1 : length - 1].gather(-1, ids[:, None]).sum()
        close = logp[b, length - 1, field.closers.to(logp.device)].exp().sum()
        probs[t, c] = probs[t, c] + score.exp() * close
    return probs


def _digit_probs(model: nn.Module, cache, start: int, field: FieldContexts) -> torch.Tensor:
    """``[tables, 10]`` next-token probability of each digit after each table's context."""
    logits, lengths = teacher_forced(model, cache, start, list(field.suffixes))
    last = torch.stack([logits[b, n - 1] for b, n in enumerate(lengths)])  # [B, V]
    digits = torch.tensor([c[0][0] for c in field.continuations], device=last.device)
    return torch.softmax(last, dim=-1)[:, digits]


def marginals(model: nn.Module, contexts: Contexts) -> list[torch.Tensor]:
    """Per field of ``contexts``, the ``[values]`` marginal renormalised over the values
    (differentiable in whatever the model's forward depends on: the edit's vectors)."""
    cache, start = prompt_cache(model, contexts.prompt)
    out = []
    for field in contexts.fields:
        if not field.suffixes:
            raise ValueError(f"no table reached {field.key.label} at row {field.row}")
        per_table = (_choice_probs if field.closers.numel() else _digit_probs)(model, cache, start, field)
        marginal = per_table.mean(dim=0)  # [C]
        out.append(marginal / marginal.sum().clamp_min(1e-30))
    return out
