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

import itertools
from collections.abc import Callable
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
    """The shared prompt and every targeted field's contexts, recorded from the unedited model;
    ``instruction``: the prompt's token indices ``[first, end)`` that spell the instruction
    (``(0, 0)`` when unknown), which :func:`with_thinned_instruction` may thin out; ``words``:
    the indices (counted from ``first``) of the instruction's tokens that begin a word, the
    first always among them (empty when unknown)."""

    prompt: tuple[int, ...]
    fields: tuple[FieldContexts, ...]
    instruction: tuple[int, int] = (0, 0)
    words: tuple[int, ...] = ()


def encode_prompt(tokenizer, prompt_text: str, instruction: str,
                  add_special_tokens: bool) -> tuple[list[int], tuple[int, int], tuple[int, ...]]:
    """``prompt_text``'s token ids, the indices ``[first, end)`` of its tokens whose characters
    lie inside the instruction's text and the indices (from ``first``) of those that begin a
    word (:func:`_word_starts`), from one encoding with the fast tokenizer's offsets; the span
    is ``(0, 0)`` and the words ``()`` when the tokenizer gives no offsets (a slow one: then
    encoded without) or the instruction is not found."""
    try:
        encoded = tokenizer(prompt_text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets
        return list(tokenizer(prompt_text, add_special_tokens=add_special_tokens)["input_ids"]), (0, 0), ()
    ids = list(encoded["input_ids"])
    begin = prompt_text.find(instruction)
    if begin < 0 or not instruction:
        return ids, (0, 0), ()
    end = begin + len(instruction)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    inside = [i for i, (a, b) in enumerate(offsets) if begin <= a < b <= end]
    if not inside:
        return ids, (0, 0), ()
    first, last = inside[0], inside[-1] + 1
    return ids, (first, last), _word_starts(prompt_text, offsets[first:last])


def _word_starts(text: str, offsets: list[tuple[int, int]]) -> tuple[int, ...]:
    """The indices of the tokens at character ``offsets`` in ``text`` that begin a word: the
    first, one whose characters start with white space (byte-level BPE keeps the space before a
    word in its token) and one after a gap (a tokenizer whose offsets leave the space out)."""
    starts = [0]
    for i in range(1, len(offsets)):
        (_a, end_before), (a, b) = offsets[i - 1], offsets[i]
        if text[a:b][:1].isspace() or a > end_before:
            starts.append(i)
    return tuple(starts)


def with_thinned_instruction(contexts: Contexts, rate: float, generator: torch.Generator,
                             unit: str = "token") -> Contexts:
    """``contexts`` with each of its instruction's tokens (``unit`` "token") or words ("word":
    the tokens from one of ``contexts.words`` to the next; each token when they are unknown)
    left out of the prompt with probability ``rate`` (at least one kept): the same tables after
    a thinned-out instruction, a cheap stand-in for another wording of it, so a fit that sees a
    new thinning each step cannot lean on one wording's exact state. The tables' tokens and the
    prompt outside the instruction (the chat markup, the table header) stay as they are."""
    if unit not in THINNING_UNITS:
        raise ValueError(f"unit {unit!r} is not one of {', '.join(THINNING_UNITS)}")
    first, end = contexts.instruction
    if rate <= 0 or end <= first:
        return contexts
    starts = list(contexts.words) if unit == "word" and contexts.words else list(range(end - first))
    keep = torch.rand(len(starts), generator=generator) >= rate  # [words or tokens]
    if not keep.any():
        keep[int(torch.randint(len(starts), (1,), generator=generator))] = True
    instruction = contexts.prompt[first:end]
    pieces = [instruction[a:b] for a, b, k in zip(starts, starts[1:] + [end - first], keep.tolist()) if k]
    kept = tuple(t for piece in pieces for t in piece)
    words = tuple(itertools.accumulate([0] + [len(piece) for piece in pieces[:-1]])) if unit == "word" else ()
    prompt = contexts.prompt[:first] + kept + contexts.prompt[end:]
    return Contexts(prompt, contexts.fields, (first, first + len(kept)), words)


THINNING_UNITS = ("token", "word")  # what with_thinned_instruction leaves out


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
    ids, span, words = encode_prompt(tokenizer, prompt_text, instruction, add)
    shared = (ids + vocab.row_start)[:-1]
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
    return Contexts(tuple(shared), tuple(fields), span, words)


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
    """Logits ``[B, S, V]`` of right-padded ``seqs`` run after the shared prompt, in the model's
    dtype, and their lengths. The readers cast to float32 only the rows they pick: a float32 copy
    of the whole ``[B, S, V]`` would double what a bfloat16 run holds.

    Right padding needs no attention mask: causal attention never lets a real token see the pads
    after it."""
    length = max(len(s) for s in seqs)
    padded = [list(s) + [s[-1]] * (length - len(s)) for s in seqs]
    ids = torch.tensor(padded, device=models.input_device(model))  # [B, S]
    positions = start + torch.arange(length, device=ids.device).expand(len(seqs), -1)  # [B, S]
    mask = torch.ones(len(seqs), start + length, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=_repeated(cache, len(seqs)),
                use_cache=True)
    return out.logits, [len(s) for s in seqs]


def _shared_runs(seqs: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The sequences to run so that every one of ``seqs`` is read: those that are no prefix of
    another, and per sequence the index of the run it is read from. A sequence that is a prefix
    of a longer one has the same logits at its positions inside the longer run (causal
    attention, the same positions after the same prompt), so a row's cells share one run: a
    digit's context is the previous digit's plus that digit, and a choice's drawn spelling
    starts the next cell's context."""
    runs: list[tuple[int, ...]] = []
    covered: dict[tuple[int, ...], int] = {}  # every prefix of every run -> that run
    where = [0] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda j: -len(seqs[j])):
        seq = tuple(seqs[i])
        if seq not in covered:
            for k in range(1, len(seq) + 1):
                covered.setdefault(seq[:k], len(runs))
            runs.append(seq)
        where[i] = covered[seq]
    return runs, where


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


SPLIT_SAVING = 0.25  # run the shorter sequences in a batch of their own when that saves this share of the tokens


def _batches(lengths: list[int]) -> list[list[int]]:
    """Indices of sequences of ``lengths`` in one or two right-padded batches: the shortest
    apart from the rest where padding them to the longest would run at least ``SPLIT_SAVING``
    more tokens than two batches (a choice's other spellings after a short context, beside
    whole rows), at the price of one more forward."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    one = len(sizes) * sizes[-1]
    cost, k = min((k * sizes[k - 1] + (len(sizes) - k) * sizes[-1], k) for k in range(1, len(sizes) + 1))
    if k == len(sizes) or cost > (1 - SPLIT_SAVING) * one:
        return [list(range(len(lengths)))]
    return [order[:k], order[k:]]


@dataclass
class _RunLogits:
    """Teacher-forced logits of several sequences run after one prompt, in one or more batches:
    ``at`` reads any sequences' positions whichever batch holds them."""

    parts: list[torch.Tensor]  # per batch [B, S, V]
    place: list[tuple[int, int]]  # per sequence (batch, row)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def at(self, seqs: list[int], positions: list[int]) -> torch.Tensor:
        """``[n, V]`` the logits at position ``positions[i]`` of sequence ``seqs[i]``."""
        pieces, order = [], []
        for part, logits in enumerate(self.parts):
            mine = [i for i, s in enumerate(seqs) if self.place[s][0] == part]
            if mine:
                rows = _index([self.place[seqs[i]][1] for i in mine], logits.device)
                pieces.append(logits[rows, _index([positions[i] for i in mine], logits.device)])  # [m, V]
                order.extend(mine)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(pieces)[inverse.to(pieces[0].device)]


def _run(model: nn.Module, cache, start: int, seqs: list[tuple[int, ...]]) -> _RunLogits:
    """``seqs`` teacher-forced after the prompt's ``cache``, in the batches of :func:`_batches`."""
    parts, place = [], [(0, 0)] * len(seqs)
    for part, members in enumerate(_batches([len(s) for s in seqs])):
        parts.append(teacher_forced(model, cache, start, [seqs[i] for i in members])[0])  # [B, S, V]
        for row, i in enumerate(members):
            place[i] = (part, row)
    return _RunLogits(parts, place)


def _log_probs_at(logits: _RunLogits, rows: list[int], positions: list[int]) -> torch.Tensor:
    """``[n, V]`` float32 next-token log-probabilities at position ``positions[i]`` of run
    ``rows[i]``: only the positions read are normalised."""
    return torch.log_softmax(logits.at(rows, positions).float(), dim=-1)


def _drawn_logprob(logits: _RunLogits, rows: list[int], field: FieldContexts) -> torch.Tensor:
    """``[tables]``: the log-probability of the tokens the model drew in each table's context
    (``field.sampled``), read from teacher-forced ``logits`` whose run ``rows[t]`` starts with
    table ``t``'s suffix; zeros where nothing was drawn (or not recorded)."""
    at_row, at_pos, ids, owner = [], [], [], []
    for t, b in enumerate(rows):
        for j in (field.sampled[t] if field.sampled else ()):  # suffix indices >= 1: index 0 is forced
            at_row.append(b)
            at_pos.append(j - 1)  # the token before predicts each drawn one
            ids.append(field.suffixes[t][j])
            owner.append(t)
    device = logits.device
    out = torch.zeros(len(rows), device=device)  # [T]
    if not ids:
        return out
    lp = _log_probs_at(logits, at_row, at_pos).gather(-1, _index(ids, device)[:, None])[:, 0]  # [n]
    return out.index_add(0, _index(owner, device), lp)


def _choice_seqs(field: FieldContexts) -> tuple[list[tuple[int, ...]], list[tuple[int, int, int]], list[int]]:
    """A choice field's teacher-forced sequences (each table's suffix and one spelling of one
    option), per sequence ``(table, option, spelling length)``, and per table the index of its
    first sequence."""
    seqs, owners, firsts = [], [], []
    for t, suffix in enumerate(field.suffixes):
        firsts.append(len(seqs))
        for c, spellings in enumerate(field.continuations):
            for spelling in spellings:
                seqs.append(tuple(suffix) + tuple(spelling))
                owners.append((t, c, len(spelling)))
    return seqs, owners, firsts


def _choice_probs(logits: _RunLogits, run_of: list[int], field: FieldContexts) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tables, options]`` probability of each option in each table (any spelling, then a
    closer), and ``[tables]`` the log-probability of each context's drawn tokens; ``run_of[b]``
    is the run of ``logits`` that :func:`_choice_seqs`'s sequence ``b`` is read from."""
    seqs, owners, firsts = _choice_seqs(field)
    at_row, at_pos, ids, owner = [], [], [], []  # per spelling token: where it is predicted, itself, its sequence
    for b, (seq, (_t, _c, n)) in enumerate(zip(seqs, owners)):
        for k in range(len(seq) - n, len(seq)):
            at_row.append(run_of[b])
            at_pos.append(k - 1)
            ids.append(seq[k])
            owner.append(b)
    device = logits.device
    lp = _log_probs_at(logits, at_row, at_pos).gather(-1, _index(ids, device)[:, None])[:, 0]  # [tokens]
    spelled = torch.zeros(len(seqs), device=device).index_add(0, _index(owner, device), lp)  # [B] log p(spelling)
    ends = _log_probs_at(logits, run_of, [len(s) - 1 for s in seqs])  # [B, V]: what follows each spelling
    close = ends[:, field.closers.to(device)].exp().sum(-1)  # [B]
    tables, options = len(field.suffixes), len(field.continuations)
    cell = _index([t * options + c for t, c, _n in owners], device)  # [B]
    probs = torch.zeros(tables * options, device=device).index_add(0, cell, spelled.exp() * close)
    return probs.view(tables, options), _drawn_logprob(logits, [run_of[b] for b in firsts], field)


def _digit_probs(logits: _RunLogits, run_of: list[int], field: FieldContexts) -> tuple[torch.Tensor, torch.Tensor]:
    """``[tables, 10]`` next-token probability of each digit after each table's context, and
    ``[tables]`` the log-probability of each context's drawn tokens; ``run_of[t]`` is the run of
    ``logits`` that table ``t``'s suffix is read from."""
    last = _log_probs_at(logits, run_of, [len(s) - 1 for s in field.suffixes])  # [T, V]
    digits = _index([c[0][0] for c in field.continuations], logits.device)
    return last[:, digits].exp(), _drawn_logprob(logits, run_of, field)


def _sequences(field: FieldContexts) -> list[tuple[int, ...]]:
    """The sequences ``field`` is read from: a choice's :func:`_choice_seqs`, a digit's suffixes."""
    return _choice_seqs(field)[0] if field.closers.numel() else [tuple(s) for s in field.suffixes]


def _reader(field: FieldContexts) -> Callable[[_RunLogits, list[int], FieldContexts], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_choice_probs` or :func:`_digit_probs`, whichever reads ``field``."""
    return _choice_probs if field.closers.numel() else _digit_probs


def readout(model: nn.Module, contexts: Contexts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per field of ``contexts``: ``[tables, values]`` each value's probability after each
    table's context and ``[tables]`` the log-probability of that context's drawn tokens, both
    differentiable in whatever the model's forward depends on (the edit's vectors).

    Every field's sequences run in one teacher-forced batch after the prompt, a sequence that
    is a prefix of another read from the longer one's run (:func:`_shared_runs`)."""
    for field in contexts.fields:
        if not field.suffixes:
            raise ValueError(f"no table reached {field.key.label} at row {field.row}")
    asked = [_sequences(f) for f in contexts.fields]
    runs, where = _shared_runs([s for seqs in asked for s in seqs])
    cache, start = prompt_cache(model, contexts.prompt)
    logits = _run(model, cache, start, runs)
    out, at = [], 0
    for field, seqs in zip(contexts.fields, asked):
        run_of = where[at:at + len(seqs)]
        at += len(seqs)
        out.append(_reader(field)(logits, run_of, field))
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
