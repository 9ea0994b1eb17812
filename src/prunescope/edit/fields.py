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
re-records them with the edit so far, since the edit also changes the earlier cells of a row);
the measurement afterwards (the probe on the edited model) writes its own. Between recordings
the fit can weight each context by how much likelier the edit so far makes the tokens the
model drew in it (:func:`readout` returns their log-probability, :func:`marginal` takes the
log-weights): self-normalised importance sampling of the edited model's own marginal, whose
gradient also reaches the earlier cells through those log-probabilities.
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
        sampled: per kept table, the indices in its suffix of the tokens the model drew (the
            cells before the field; the template's forced tokens left out): the product of
            their probabilities is how likely the model was to write that context, what
            :func:`context_weights` reweights by.
    """

    row: int
    key: FieldKey
    values: tuple[str, ...]
    suffixes: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[tuple[int, ...], ...], ...]
    closers: torch.Tensor
    sampled: tuple[tuple[int, ...], ...] = ()


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
    starts: dict[tuple[int, int], list[int]] = {}  # (row, column) -> per table, suffix index of the cell's start

    def on_cell(row: int, column: int, batch: Batch) -> None:
        starts.setdefault((row + 1, column), []).extend(len(h) - len(shared) for h in batch.history)
        if (row + 1, column) in seen:
            seen[(row + 1, column)].extend(h[len(shared):] for h in batch.history)

    written = write_tables(model, tokenizer, template, rows, tables, seed, exact=False, instruction=instruction,
                           batch_size=batch_size, progress=False, draws="iid", on_cell=on_cell)
    fields = []
    for t in targets:
        for r in _rows(t, rows):
            c = _column_index(template, t.key.column)
            drawn = _drawn_before(written, starts, (r, c), template, vocab)
            fields.append(_field(t, r, seen[(r, c)], drawn, written, c, vocab, template))
    return Contexts(tuple(shared), tuple(fields))


def _drawn_before(written: Tables, starts: dict[tuple[int, int], list[int]], cell: tuple[int, int],
                  template: Template, vocab: Vocab) -> list[list[int]]:
    """Per table, the suffix indices of the tokens the model drew in the cells before ``cell``
    (1-based row, column): each cell's drawn tokens follow its start (and a digits cell's forced
    lead); what the writer forced between them is not the model's choice."""
    out: list[list[int]] = [[] for _ in starts[cell]]
    for (row, column), begin in starts.items():
        if (row, column) >= cell:
            continue
        lead = len(vocab.digit_lead) if template.columns[column].type == "digits" else 0
        for table, (first, tokens) in enumerate(zip(begin, written.cells[row - 1][column].tokens)):
            out[table].extend(range(first + lead, first + lead + len(tokens)))
    return out


def _rows(target: Target, rows: int) -> list[int]:
    return [r for r in (target.rows or range(1, rows + 1)) if r <= rows]


def _field(target: Target, row: int, suffixes: list[list[int]], drawn: list[list[int]], written: Tables,
           column: int, vocab: Vocab, template: Template) -> FieldContexts:
    col = template.columns[column]
    if col.type == "choice":
        conts = tuple(tuple(tuple(ids) for ids in vocab.spellings[col.name][i]) for i in range(len(col.choices)))
        return FieldContexts(row, target.key, target.values, tuple(tuple(s) for s in suffixes), conts,
                             vocab.closers, tuple(tuple(d) for d in drawn))
    k = target.key.position or 1
    digit_set = set(vocab.digits)
    kept, kept_drawn = [], []
    for suffix, before, cell in zip(suffixes, drawn, written.cells[row - 1][column].tokens):
        if len(cell) >= k - 1 and all(t in digit_set for t in cell[: k - 1]):
            lead = len(suffix) + len(vocab.digit_lead)  # the cell's own earlier digits were drawn too
            kept.append(tuple(suffix) + tuple(vocab.digit_lead) + tuple(cell[: k - 1]))
            kept_drawn.append(tuple(before) + tuple(range(lead, lead + k - 1)))
    if not kept:
        raise PrunescopeError(
            f"none of the {len(suffixes)} tables written for fitting reached {target.key.label} at row {row} "
            f"(each wrote fewer than {k} digits there); target an earlier digit or fit on more tables"
        )
    conts = tuple(((d,),) for d in vocab.digits)
    return FieldContexts(row, target.key, target.values, tuple(kept), conts, torch.empty(0, dtype=torch.long),
                         tuple(kept_drawn))


def prompt_cache(model: nn.Module, prompt: tuple[int, ...]):
    """The shared prompt's KV cache (autograd graph kept) and its length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt], device=models.input_device(model))  # [1, T0]
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, len(prompt)


def _repeated(cache, batch: int):
    """A new cache holding ``cache``'s keys and values repeated ``batch`` times (differentiably,
    as views: no copy is kept)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)  # [B, kv, T0, d]
        out.update(keys, values, index)  # sets the layer up (its copy is dropped on the next line)
        out.layers[index].keys, out.layers[index].values = keys, values
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


def _drawn_logprob(logits: torch.Tensor, rows: list[int], field: FieldContexts) -> torch.Tensor:
    """``[tables]``: the log-probability of the tokens the model drew in each table's context
    (``field.sampled``), read from teacher-forced ``logits`` ``[B, S, V]`` whose batch row
    ``rows[t]`` holds table ``t``'s suffix; zeros where nothing was drawn (or not recorded)."""
    out = []
    for t, b in enumerate(rows):
        drawn = field.sampled[t] if field.sampled else ()
        if not drawn:
            out.append(logits.new_zeros(()))
            continue
        at = torch.tensor(drawn, device=logits.device)  # [n] suffix indices (>= 1: index 0 is forced)
        ids = torch.tensor([field.suffixes[t][j] for j in drawn], device=logits.device)  # [n]
        picked = logits[b, at - 1].float()  # [n, V]: the token before predicts each drawn one
        out.append((picked.gather(-1, ids[:, None])[:, 0] - picked.logsumexp(-1)).sum())
    return torch.stack(out)


def _choice_probs(model: nn.Module, cache, start: int, field: FieldContexts) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tables, options]`` probability of each option in each table (any spelling, then a
    closer), and ``[tables]`` the log-probability of each context's drawn tokens."""
    seqs, owners, rows = [], [], []
    for t, suffix in enumerate(field.suffixes):
        rows.append(len(seqs))
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
    return probs, _drawn_logprob(logp, rows, field)


def _digit_probs(model: nn.Module, cache, start: int, field: FieldContexts) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tables, 10]`` next-token probability of each digit after each table's context, and
    ``[tables]`` the log-probability of each context's drawn tokens."""
    logits, lengths = teacher_forced(model, cache, start, list(field.suffixes))
    last = torch.stack([logits[b, n - 1] for b, n in enumerate(lengths)])  # [B, V]
    digits = torch.tensor([c[0][0] for c in field.continuations], device=last.device)
    return torch.softmax(last, dim=-1)[:, digits], _drawn_logprob(logits, list(range(len(lengths))), field)


def readout(model: nn.Module, contexts: Contexts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per field of ``contexts``: ``[tables, values]`` each value's probability after each
    table's context and ``[tables]`` the log-probability of that context's drawn tokens, both
    differentiable in whatever the model's forward depends on (the edit's vectors)."""
    cache, start = prompt_cache(model, contexts.prompt)
    out = []
    for field in contexts.fields:
        if not field.suffixes:
            raise ValueError(f"no table reached {field.key.label} at row {field.row}")
        out.append((_choice_probs if field.closers.numel() else _digit_probs)(model, cache, start, field))
    return out


def mass(per_table: torch.Tensor, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[values]``: the mean over tables of ``per_table`` ``[tables, values]`` (weighted by
    ``softmax(log_weight)`` when given), not renormalised: its sum is how often the cell holds
    one of the values at all."""
    if log_weight is None:
        return per_table.mean(dim=0)  # [C]
    return (torch.softmax(log_weight, dim=0)[:, None] * per_table).sum(dim=0)  # [C]


def marginal(per_table: torch.Tensor, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[values]``: :func:`mass` renormalised over the values (what the probe reports)."""
    mean = mass(per_table, log_weight)
    return mean / mean.sum().clamp_min(1e-30)


def effective_tables(log_weight: torch.Tensor) -> float:
    """Kish's effective sample size ``1 / sum w^2`` of the normalised weights ``softmax(log_weight)``."""
    w = torch.softmax(log_weight.detach().double(), dim=0)
    return float(1.0 / (w * w).sum())


def marginals(model: nn.Module, contexts: Contexts) -> list[torch.Tensor]:
    """Per field of ``contexts``, the ``[values]`` marginal over its tables, renormalised over
    the values (differentiable, see :func:`readout`)."""
    return [marginal(per_table) for per_table, _drawn in readout(model, contexts)]
