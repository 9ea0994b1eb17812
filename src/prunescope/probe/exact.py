"""Exact probabilities of whole values, read from the raw logits (no sampling, no processors).

Tokenization: a value's probability is computed over the *canonical* token sequence, the one the
tokenizer produces for ``prefix + value`` in context. The prefix tokens that the tokenizer leaves
unchanged for every choice form the shared context; everything after (a trailing part of the
prefix that merges with the value, e.g. the space in ``"| " + "Male"`` -> ``"|", " Male"``) is
scored as part of the value. Other tokenizations of the same string are not counted, so the
total mass is a lower bound of the string-level mass.

Choices that are prefixes of others: when a choice's token sequence is a proper prefix of another
choice's, the longer choices' probabilities are subtracted, so each choice is the exclusive event
"exactly this choice" (e.g. ``"1"`` means one then not ``"12"``) and the probabilities sum to <= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunescope.errors import PrunescopeError
from prunescope.probe.decode import Batch


@dataclass(frozen=True)
class ValueDistribution:
    """Exact distribution over choices following a prefix.

    Attributes:
        choices: the choice strings, in the order given.
        probs: probability of each choice, normalised over the choices.
        raw: unnormalised probability of each choice (exclusive events).
        total_mass: ``sum(raw)``: how much probability the model puts on any allowed choice.
        context_tokens: number of prefix tokens used as shared context.
    """

    choices: tuple[str, ...]
    probs: tuple[float, ...]
    raw: tuple[float, ...]
    total_mass: float
    context_tokens: int


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer writes them (special tokens as configured)."""
    return list(tokenizer(text)["input_ids"])


def split_continuations(tokenizer, prefix: str, values: list[str]) -> tuple[list[int], list[list[int]]]:
    """Shared context ids and each value's continuation ids, under canonical tokenization.

    The context is the longest run of prefix tokens that ``prefix + value`` keeps unchanged for
    every value; each continuation is the rest of ``prefix + value``'s tokens.
    """
    base = encode(tokenizer, prefix)
    fulls = [encode(tokenizer, prefix + v) for v in values]
    k = len(base)
    for full in fulls:
        same = 0
        while same < min(k, len(full)) and full[same] == base[same]:
            same += 1
        k = same
    conts = [full[k:] for full in fulls]
    if k == 0:
        raise PrunescopeError(f"prefix {prefix!r} leaves no token of shared context; give a longer prefix")
    empty = [v for v, c in zip(values, conts) if not c]
    if empty:
        raise PrunescopeError(f"choices {empty} add no token after prefix {prefix!r}; give non-empty choices")
    return base[:k], conts


def exclusive(raw: torch.Tensor, conts: list[list[int]]) -> torch.Tensor:
    """Make (…, C) sequence probabilities exclusive: subtract each choice's minimal extensions."""
    out = raw.clone()
    for a, ca in enumerate(conts):
        longer = [b for b, cb in enumerate(conts) if len(cb) > len(ca) and cb[: len(ca)] == ca]
        minimal = [
            b for b in longer
            if not any(len(conts[c]) < len(conts[b]) and conts[b][: len(conts[c])] == conts[c] for c in longer)
        ]
        for b in minimal:
            out[..., a] -= raw[..., b]
    return out.clamp_min(0.0)


def choice_probs(batch: Batch, conts: list[list[int]]) -> torch.Tensor:
    """(B, C) exclusive probabilities of each continuation for every sequence of ``batch``."""
    raw = torch.stack([batch.peek(c).exp() for c in conts], dim=1)  # (B, C)
    return exclusive(raw, conts)


NEGLIGIBLE = 1e-7  # a spelling whose first token is less likely than this in every sequence is not scored


def spelled_choice_probs(batch: Batch, spellings: list[list[list[int]]], closers: torch.Tensor) -> torch.Tensor:
    """(B, C) probability that each sequence writes option ``c`` in any listed spelling, then ends the cell.

    ``spellings[c]`` lists token sequences that all read as option ``c`` (e.g. ``" Male"`` and
    ``"Male"``); ``closers`` (K,) are the tokens that end a cell without adding text to the value
    (``" |"``, ``"|"``, ``"\n"``, ...). The events "spelling s, then any closer" are disjoint, so
    their probabilities add up: P(c) = sum_s P(s) * P(closer | s). Spellings whose first token has
    probability below ``NEGLIGIBLE`` in every sequence are skipped (they add less than that).
    """
    first = torch.softmax(batch.logits, dim=-1)  # (B, V)
    columns = []
    for variants in spellings:
        total = torch.zeros(batch.size, dtype=torch.float64)
        for ids in variants:
            if float(first[:, ids[0]].max()) < NEGLIGIBLE:
                continue
            logp, after = batch.look(ids)  # (B,), (B, V)
            close = torch.softmax(after, dim=-1)[:, closers].sum(dim=1)  # (B,)
            total += (logp.exp() * close).double()
        columns.append(total)
    return torch.stack(columns, dim=1)  # (B, C)


@torch.no_grad()
def value_distribution(
    model: nn.Module, tokenizer, prefix: str, choices: list[str] | tuple[str, ...], end: str = ""
) -> ValueDistribution:
    """Exact probability of each choice string following ``prefix`` (a plain string, no chat template).

    Args:
        prefix: the text before the value.
        choices: distinct candidate values.
        end: text that must follow each choice (e.g. ``" |"``) so the value is complete.

    Returns:
        A :class:`ValueDistribution`: probabilities normalised over the choices and the
        unnormalised total mass alongside (see the module docstring for tokenization).
    """
    choices = tuple(choices)
    if not choices:
        raise PrunescopeError("value_distribution needs at least one choice; got an empty list")
    if len(set(choices)) != len(choices):
        raise PrunescopeError(f"choices must be distinct, got {list(choices)}")
    context, conts = split_continuations(tokenizer, prefix, [c + end for c in choices])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = Batch.start(model, context, 1, pad)
    raw = choice_probs(batch, conts)[0].double()  # (C,)
    total = float(raw.sum())
    probs = raw / total if total > 0 else torch.full_like(raw, float("nan"))
    return ValueDistribution(choices, tuple(probs.tolist()), tuple(raw.tolist()), total, len(context))
