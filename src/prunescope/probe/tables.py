"""Write N tables at once with one KV cache and read the exact field distributions on the way.

The scaffold (prompt, header, the ``|`` that opens a row and the newline between rows) is forced.
Every cell is *sampled freely* from the model's own distribution (temperature 1 by default, no
grammar restriction) until the model writes a token containing the delimiter ``|`` (or a newline,
an end-of-sequence token, or the column's token limit, after which `` |`` is forced). So later rows
are conditioned on what the model really writes, and out-of-grammar values are recorded, not
prevented. Before a cell is sampled, its exact distribution is read from the raw logits:

- ``choice``: probability that the cell reads as each option: the option in each of its spellings
  (with and without a leading space, e.g. ``" Male"`` and ``"Male"``), followed by any token that
  ends the cell without adding text (``" |"``, ``"|"``, a newline, ...), as the sampled cell would be
  read (see :func:`.exact.spelled_choice_probs`);
- ``digits``: at each digit position, the next-token distribution over the ten digit tokens
  (the tokenizer must write each digit as its own token; checked), for the sequences still writing
  digits; the mass outside counts everything that is neither a digit nor, once ``min_length``
  digits are written, a token that ends the cell without adding text (`` |``, ``|``, a newline);
- ``text``: the first-token distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope.errors import PrunescopeError
from prunescope.probe.decode import Batch
from prunescope.probe.exact import encode, split_continuations, spelled_choice_probs
from prunescope.probe.sampling import make_sampler
from prunescope.probe.template import Column, Template

log = logging.getLogger(__name__)

_ANCHOR = "| x |"  # a cell just closed by the model: the context every cell starts from


@dataclass
class CellObservations:
    """What was seen at one (row, column) over the batch (raw material for the statistics).

    Attributes:
        values: the sampled cell value of every table (stripped text).
        exact: choice: (B, C) probabilities of each option (unnormalised, exclusive events);
            digits: per digit position a (B_j, 10) tensor of next-token probabilities of the ten
            digits (after the forced lead) for the B_j tables still writing digits; text: unused.
        mass: per entry of ``exact``, the (B,) or (B_j,) probability mass outside the grammar.
        first_token: text: (V,) sum over the batch of the first-token distribution.
        tokens: the tokens each table wrote in the cell (after any forced lead).
    """

    values: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    exact: list[torch.Tensor] = field(default_factory=list)
    mass: list[torch.Tensor] = field(default_factory=list)
    first_token: torch.Tensor | None = None


@dataclass(frozen=True)
class Vocab:
    """Token ids of the scaffold and the grammar, derived from the tokenizer once."""

    row_start: list[int]
    between_rows: list[int]
    cell_end: list[int]
    digit_lead: list[int]
    digits: list[int]
    spellings: dict[str, list[list[list[int]]]]
    closers: torch.Tensor
    stop: frozenset[int]
    pad: int


def _tail(tokenizer, prefix: str, text: str, what: str) -> list[int]:
    """Tokens that ``text`` adds after ``prefix`` when the prefix's tokens stay unchanged."""
    context, (cont,) = split_continuations(tokenizer, prefix, [text])
    if len(context) != len(encode(tokenizer, prefix)):
        raise PrunescopeError(f"the tokenizer merges {what} {text!r} into the text before it; this table scaffold is unsupported")
    return cont


def build_vocab(tokenizer, template: Template, header_prompt: str) -> Vocab:
    """Derive and check the scaffold's token ids for ``tokenizer``."""
    digit_conts = [_tail(tokenizer, _ANCHOR, f" {d}", "a digit") for d in range(10)]
    lead = digit_conts[0][:-1]
    number = _tail(tokenizer, _ANCHOR, " 1234567890", "a number")
    if any(len(c) != len(lead) + 1 or c[:-1] != lead for c in digit_conts) or number != lead + [
        c[-1] for c in digit_conts[1:] + digit_conts[:1]
    ]:
        raise PrunescopeError("digits columns need a tokenizer that writes each digit as its own token; this one merges them")
    spellings = {
        col.name: [_spellings(tokenizer, c) for c in col.choices] for col in template.columns if col.type == "choice"
    }
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    stop = frozenset(i for i, p in pieces.items() if "|" in p or "\n" in p or i in specials)
    closers = sorted(i for i in stop if i not in specials and not _cell_text(pieces[i]).strip())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Vocab(
        row_start=_tail(tokenizer, header_prompt, "|", "the row start"),
        between_rows=_tail(tokenizer, _ANCHOR, "\n|", "the row break"),
        cell_end=_tail(tokenizer, "| x", " |", "the cell end"),
        digit_lead=lead,
        digits=[c[-1] for c in digit_conts],
        spellings=spellings,
        closers=torch.tensor(closers, dtype=torch.long),
        stop=stop,
        pad=pad,
    )


def _cell_text(text: str) -> str:
    """The part of a cell's text that becomes its value: everything before ``|`` or a newline."""
    return text.split("|")[0].split("\n")[0]


def _spellings(tokenizer, option: str) -> list[list[int]]:
    """Token sequences that a cell reads as ``option`` (stripped): with and without a leading space."""
    out: list[list[int]] = []
    for lead in (" ", ""):
        try:
            ids = _tail(tokenizer, _ANCHOR, lead + option, "a choice")
        except PrunescopeError:
            continue  # this spelling merges into the cell delimiter: the sampler cannot write it apart
        if ids not in out:
            out.append(ids)
    if not out:
        raise PrunescopeError(f"choice {option!r} cannot be tokenized apart from the cell delimiter '|'")
    return out


def build_prompt(tokenizer, template: Template, rows: int, instruction: str | None = None) -> str:
    """The text before the first row: chat template when the tokenizer has one, plain otherwise."""
    text = template.instruction(rows) if instruction is None else instruction
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    else:
        head = text + "\n\n"
    return head + template.header()


class TableWriter:
    """Samples cells for a :class:`Batch` and records the exact distributions."""

    def __init__(self, batch: Batch, tokenizer, vocab: Vocab, generator: torch.Generator,
                 temperature: float, exact: bool, draws: str = "iid") -> None:
        self.batch, self.tokenizer, self.vocab = batch, tokenizer, vocab
        self.temperature, self.exact = temperature, exact
        self.sampler = make_sampler(draws, batch.size, generator)

    def force(self, ids: list[int], active: torch.Tensor | None = None) -> None:
        """Feed the same tokens to every (active) sequence."""
        if ids:
            self.batch.feed(torch.tensor(ids).expand(self.batch.size, -1), active)

    def _sample(self, active: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.batch.logits / self.temperature, dim=-1)  # (B, V)
        return self.sampler.draw(probs, active)  # (B,)

    def free_cell(self, max_tokens: int, obs: CellObservations, observe=None, on_token=None) -> None:
        """Sample every sequence until it writes a stop token; force the cell end where needed."""
        b = self.batch.size
        active = torch.ones(b, dtype=torch.bool)
        closed = torch.zeros(b, dtype=torch.bool)
        written: list[list[int]] = [[] for _ in range(b)]
        for step in range(max_tokens):
            if observe is not None:
                observe(step, active)
            tok = self._sample(active)
            self.batch.feed(tok[:, None], active)
            for i in torch.nonzero(active)[:, 0].tolist():
                t = int(tok[i])
                written[i].append(t)
                if on_token is not None:
                    on_token(i, t)
                if t in self.vocab.stop:
                    active[i] = False
                    closed[i] = "|" in self.tokenizer.decode([t])
            if not active.any():
                break
        self.force(self.vocab.cell_end, ~closed)
        obs.values = [self._value(w) for w in written]
        obs.tokens = written

    def _value(self, tokens: list[int]) -> str:
        """The cell text: everything before the delimiter, stripped."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return text.split("|")[0].split("\n")[0].strip()

    def choice_cell(self, col: Column, obs: CellObservations) -> None:
        if self.exact:
            raw = spelled_choice_probs(self.batch, self.vocab.spellings[col.name], self.vocab.closers)  # (B, C)
            obs.exact.append(raw)
            obs.mass.append((1.0 - raw.sum(dim=1)).clamp_min(0.0))
        self.free_cell(col.max_tokens, obs)

    def text_cell(self, col: Column, obs: CellObservations) -> None:
        def observe(step: int, active: torch.Tensor) -> None:
            if self.exact and step == 0:
                obs.first_token = torch.softmax(self.batch.logits, dim=-1).sum(dim=0)  # (V,)
        self.free_cell(col.max_tokens, obs, observe)

    def digits_cell(self, col: Column, obs: CellObservations) -> None:
        v = self.vocab
        lead_p = self.batch.peek(v.digit_lead).exp() if self.exact and v.digit_lead else torch.ones(self.batch.size)
        self.force(v.digit_lead)
        in_digits = torch.ones(self.batch.size, dtype=torch.bool)
        digit_ids = torch.tensor(v.digits)

        def observe(step: int, active: torch.Tensor) -> None:
            keep = active & in_digits
            if not self.exact or step >= col.max_length or not keep.any():
                return
            probs = torch.softmax(self.batch.logits[keep], dim=-1)  # (B_j, V)
            pd = probs[:, digit_ids]  # (B_j, 10)
            allowed = pd.sum(dim=1)
            if step >= col.min_length:
                allowed = allowed + probs[:, v.closers].sum(dim=1)  # the cell may end here
            scale = lead_p[keep] if step == 0 else torch.ones_like(allowed)
            obs.exact.append(pd)
            obs.mass.append(1.0 - scale * allowed)

        digit_set = set(v.digits)

        def on_token(i: int, t: int) -> None:
            if t not in digit_set:
                in_digits[i] = False

        self.free_cell(col.max_length + 3, obs, observe, on_token)


@dataclass(frozen=True)
class Tables:
    """Observations ``cells[row][column]`` and the token positions run through the model."""

    cells: list[list[CellObservations]]
    forward_tokens: int


@torch.no_grad()
def write_tables(
    model: nn.Module, tokenizer, template: Template, rows: int, n: int, seed: int,
    temperature: float = 1.0, exact: bool = True, instruction: str | None = None,
    batch_size: int = 64, progress: bool = True, draws: str | None = None,
    exact_columns: Collection[str] | None = None,
    on_cell: Callable[[int, int, Batch], None] | None = None,
) -> "Tables":
    """Write ``n`` tables of ``rows`` rows; return the observations, indexed ``[row][column]``.

    Tables are written ``batch_size`` at a time; the observations of all batches are merged.
    ``instruction`` replaces the template's instruction (used for content-free calibration).
    ``draws`` (``iid`` or ``rqmc``, see :mod:`.sampling`) defaults to ``rqmc`` in exact mode and
    ``iid`` otherwise. ``exact_columns`` limits the exact readout to those columns (None: all);
    the others are only sampled, which saves the choice-scoring forwards of columns not studied.
    ``on_cell(row, column, batch)`` (0-based) is called before each cell is written: the batch's
    ``history`` then holds every table's context of that cell.
    """
    draws = draws or ("rqmc" if exact else "iid")
    prompt = build_prompt(tokenizer, template, rows, instruction)
    vocab = build_vocab(tokenizer, template, prompt)
    add = not bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    merged = [[CellObservations() for _ in template.columns] for _ in range(rows)]
    fed = 0
    bar = tqdm(total=n * rows, desc="probe rows", unit="row", disable=not progress)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        batch = Batch.start(model, prompt_ids + vocab.row_start, size, vocab.pad)
        writer = TableWriter(batch, tokenizer, vocab, gen, temperature, exact, draws)
        for r in range(rows):
            if r:
                writer.force(vocab.between_rows)
            for c, col in enumerate(template.columns):
                obs = CellObservations()
                writer.exact = exact and (exact_columns is None or col.name in exact_columns)
                if on_cell is not None:
                    on_cell(r, c, batch)
                getattr(writer, f"{col.type}_cell")(col, obs)
                _merge(merged[r][c], obs)
            bar.update(size)
        fed += batch.tokens_fed
    bar.close()
    return Tables(merged, fed)


def _merge(into: CellObservations, obs: CellObservations) -> None:
    """Append one batch's observations of a cell to the running totals."""
    into.values.extend(obs.values)
    into.tokens.extend(obs.tokens)
    if obs.first_token is not None:
        into.first_token = obs.first_token if into.first_token is None else into.first_token + obs.first_token
    if not into.exact:
        into.exact, into.mass = list(obs.exact), list(obs.mass)
        return
    # digits: one entry per position; choice: one entry. Concatenate position-wise over batches.
    for j, (e, m) in enumerate(zip(obs.exact, obs.mass)):
        if j < len(into.exact):
            into.exact[j] = torch.cat([into.exact[j], e])
            into.mass[j] = torch.cat([into.mass[j], m])
        else:
            into.exact.append(e)
            into.mass.append(m)
