"""Exact probabilities of the probe against direct, one-forward-at-a-time computations."""

from __future__ import annotations

import math

import pytest
import torch

from prunescope.errors import PrunescopeError
from prunescope.probe import value_distribution
from prunescope.probe.decode import Batch
from prunescope.probe.exact import encode, exclusive


def _direct_logprob(model, context: list[int], cont: list[int]) -> float:
    """log P(cont | context) as a product of next-token probabilities, one full forward per token."""
    total, ids = 0.0, list(context)
    for t in cont:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[t])
        ids.append(t)
    return total


def test_value_distribution_matches_direct_forwards(tiny_model, tiny_tokenizer_):
    prefix = "| Name | Gender |\n| Bob |"
    choices = ["Male", "Female", "fox jumps"]
    vd = value_distribution(tiny_model, tiny_tokenizer_, prefix, choices, end=" |")
    fulls = [encode(tiny_tokenizer_, prefix + c + " |") for c in choices]
    k = vd.context_tokens
    assert all(f[:k] == fulls[0][:k] for f in fulls)
    raw = [math.exp(_direct_logprob(tiny_model, fulls[0][:k], f[k:])) for f in fulls]
    assert vd.raw == pytest.approx(raw, rel=1e-4)
    assert vd.total_mass == pytest.approx(sum(raw), rel=1e-4)
    assert vd.probs == pytest.approx([r / sum(raw) for r in raw], rel=1e-4)
    assert sum(vd.probs) == pytest.approx(1.0)


def test_trailing_space_of_prefix_merges_into_the_value(tiny_model, tiny_tokenizer_):
    """'| x ' + '|' is scored as the tokens the tokenizer writes for '| x |' (the space joins the value)."""
    assert [tiny_tokenizer_.decode([t]) for t in encode(tiny_tokenizer_, "| x |")][-1] == " |"
    a = value_distribution(tiny_model, tiny_tokenizer_, "| x ", ["|", "Male"])
    b = value_distribution(tiny_model, tiny_tokenizer_, "| x", [" |", " Male"])
    assert a.context_tokens == b.context_tokens
    assert a.raw == pytest.approx(b.raw, rel=1e-5)


def test_choices_that_are_prefixes_of_others_are_exclusive(tiny_model, tiny_tokenizer_):
    prefix = "The quick brown"
    choices = [" fox", " fox jumps", " fox jumps over"]
    vd = value_distribution(tiny_model, tiny_tokenizer_, prefix, choices)
    fulls = [encode(tiny_tokenizer_, prefix + c) for c in choices]
    k = vd.context_tokens
    p = [math.exp(_direct_logprob(tiny_model, fulls[0][:k], f[k:])) for f in fulls]
    # " fox" then not " jumps..." = P(fox) - P(fox jumps); the longest keeps its own probability.
    assert vd.raw == pytest.approx([p[0] - p[1], p[1] - p[2], p[2]], rel=1e-4, abs=1e-12)
    assert sum(vd.raw) == pytest.approx(p[0], rel=1e-4)


def test_exclusive_subtracts_only_minimal_extensions():
    raw = torch.tensor([[0.5, 0.3, 0.1, 0.05]])
    conts = [[1], [1, 2], [1, 2, 3], [4]]
    out = exclusive(raw, conts)
    assert out.tolist()[0] == pytest.approx([0.2, 0.2, 0.1, 0.05])


def test_value_distribution_bad_input(tiny_model, tiny_tokenizer_):
    with pytest.raises(PrunescopeError, match="at least one choice"):
        value_distribution(tiny_model, tiny_tokenizer_, "| Bob |", [])
    with pytest.raises(PrunescopeError, match="distinct"):
        value_distribution(tiny_model, tiny_tokenizer_, "| Bob |", ["a", "a"])


def test_batch_with_pauses_matches_unbatched_forwards(tiny_model):
    """Sequences that pause (masked pads) compute exactly what they would alone."""
    prompt = [5, 6, 7, 8]
    batch = Batch.start(tiny_model, prompt, 3, pad_id=0)
    fed = [[], [], []]
    steps = [([10, 11, 12], [1, 1, 1]), ([13, 14, 15], [1, 0, 1]), ([16, 17, 18], [0, 1, 1]), ([19, 20, 21], [1, 1, 0])]
    for ids, act in steps:
        batch.feed(torch.tensor(ids)[:, None], torch.tensor(act, dtype=torch.bool))
        for i in range(3):
            if act[i]:
                fed[i].append(ids[i])
    for i in range(3):
        with torch.no_grad():
            ref = tiny_model(input_ids=torch.tensor([prompt + fed[i]])).logits[0, -1]
        torch.testing.assert_close(batch.logits[i], ref, rtol=1e-4, atol=1e-4)
        assert int(batch.pos[i]) == len(prompt) + len(fed[i])


def test_peek_scores_without_changing_the_state(tiny_model):
    batch = Batch.start(tiny_model, [5, 6, 7], 2, pad_id=0)
    batch.feed(torch.tensor([[9], [10]]))
    before = batch.logits.clone()
    lp = batch.peek([20, 21, 22])
    for i, last in enumerate([9, 10]):
        assert float(lp[i]) == pytest.approx(_direct_logprob(tiny_model, [5, 6, 7, last], [20, 21, 22]), abs=1e-4)
    torch.testing.assert_close(batch.logits, before)
    batch.feed(torch.tensor([[30], [31]]))
    with torch.no_grad():
        ref = tiny_model(input_ids=torch.tensor([[5, 6, 7, 9, 30]])).logits[0, -1]
    torch.testing.assert_close(batch.logits[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_bundled_model_gender_after_a_table_prefix(bundled):
    """SmolLM2 puts most of its mass on the two listed genders after a table row's name."""
    from prunescope.probe.tables import build_vocab
    from prunescope.probe import load_template

    torch.set_num_threads(1)  # decode steps are tiny: one thread is faster on a shared CPU
    model, tokenizer = bundled
    vocab = build_vocab(tokenizer, load_template("people"), "| Name | Gender | Age |\n|---|---|---|\n")
    assert len(set(vocab.digits)) == 10  # SmolLM2 writes each digit as its own token
    prefix = "| Name | Gender | Age |\n|---|---|---|\n| John Smith | "
    vd = value_distribution(model, tokenizer, prefix, ["Male", "Female", "Non-binary"], end=" |")
    assert sum(vd.probs) == pytest.approx(1.0)
    assert vd.probs[0] > vd.probs[2] and vd.probs[1] > vd.probs[2]
    assert 0.3 < vd.total_mass <= 1.0


def _direct_spelled(model, context: list[int], spellings: list[list[int]], closers: list[int]) -> float:
    """P(any spelling, then any closer | context) from full forwards, one spelling at a time."""
    total = 0.0
    for ids in spellings:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + ids])).logits[0, -1].double()
        close = float(torch.softmax(logits, -1)[closers].sum())
        total += math.exp(_direct_logprob(model, context, ids)) * close
    return total


def test_spelled_choice_probs_match_direct_forwards(tiny_model):
    """Sum over spellings x closers, read from the KV-cached batch, equals direct forwards."""
    from prunescope.probe.exact import spelled_choice_probs

    contexts = [[5, 6, 7], [5, 6, 8]]
    batch = Batch.start(tiny_model, [5, 6], 2, pad_id=0)
    batch.feed(torch.tensor([[7], [8]]))
    spellings = [[[20], [21, 22]], [[30, 31, 32]], [[40]]]
    closers = torch.tensor([3, 9, 11])
    got = spelled_choice_probs(batch, spellings, closers)  # (2, 3)
    for b, ctx in enumerate(contexts):
        for c, sp in enumerate(spellings):
            want = _direct_spelled(tiny_model, ctx, sp, closers.tolist())
            assert float(got[b, c]) == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert float(got.sum(dim=1).max()) < 1.0


def test_negligible_spellings_are_skipped(tiny_model, monkeypatch):
    """A spelling whose first token is below NEGLIGIBLE everywhere is not scored (adds less than that)."""
    from prunescope.probe import exact

    batch = Batch.start(tiny_model, [5, 6], 1, pad_id=0)
    first = torch.softmax(batch.logits[0], -1)
    rare, common = int(first.argmin()), int(first.argmax())
    monkeypatch.setattr(exact, "NEGLIGIBLE", float(first[rare]) * 1.0001)
    got = exact.spelled_choice_probs(batch, [[[rare, 4]], [[common, 4]]], torch.tensor([9]))
    assert float(got[0, 0]) == 0.0 and float(got[0, 1]) > 0.0


@pytest.mark.integration
def test_batched_exact_gender_equals_direct_forwards_of_each_table(bundled):
    """What the KV-cached batch reads for each table equals direct forwards over that table's ids."""
    from prunescope.probe import load_template
    from prunescope.probe.tables import build_prompt, build_vocab, write_tables

    torch.set_num_threads(1)  # decode steps are tiny: one thread is faster on a shared CPU
    model, tokenizer = bundled
    template = load_template("people")
    prompt = build_prompt(tokenizer, template, 1)
    vocab = build_vocab(tokenizer, template, prompt)
    assert [tokenizer.decode(s) for s in vocab.spellings["Gender"][0]] == [" Male", "Male"]
    closers = {tokenizer.decode([int(i)]) for i in vocab.closers}
    assert {" |", "|", "\n", "||"} <= closers
    read = {c: ("Male" + c).split("|")[0].split("\n")[0].strip() for c in closers}  # as the sampler reads a cell
    assert set(read.values()) == {"Male"}, {c: v for c, v in read.items() if v != "Male"}
    tables = write_tables(model, tokenizer, template, 1, 2, seed=0, batch_size=2, progress=False)
    name, gender = tables.cells[0][0], tables.cells[0][1]
    head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + vocab.row_start
    for i in range(2):
        context = head + name.tokens[i]
        context += [] if "|" in tokenizer.decode(name.tokens[i][-1:]) else vocab.cell_end
        want = [_direct_spelled(model, context, sp, vocab.closers.tolist()) for sp in vocab.spellings["Gender"]]
        assert gender.exact[0][i].tolist() == pytest.approx(want, rel=1e-3, abs=1e-6)
