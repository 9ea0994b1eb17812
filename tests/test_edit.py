"""``prunescope edit`` on tiny models: the differentiable field distributions against the probe's
exact readout, each kind of edit doing what it says, the job and the command end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch

from prunescope import cli
from prunescope.edit import fields, hooks, job, methods
from prunescope.edit.hooks import Edit, LayerEdit, applied
from prunescope.edit.targets import parse_targets
from prunescope.pruning import apply
from prunescope.probe.tables import write_tables
from prunescope.probe.template import Template, load_template

from prunescope.testing import digit_model


@pytest.fixture(scope="module")
def people():
    return load_template("people")


def _unrelated_text(folder):
    """A short repetitive text file: perplexity, the fit's KL and the side effects of the CLI runs."""
    text = folder / "text.txt"
    text.write_text(" ".join(f"word{i % 50} and {i}" for i in range(600)))
    return text


def _targets(template, *specs):
    return parse_targets(list(specs), template)


def test_marginals_equal_the_probes_exact_readout(dtok, people):
    """Teacher-forced marginals (gradients possible) == the probe's KV-cached exact readout, on
    the very tables the probe wrote (same seed, batch and draws), for a choice and two digits."""
    model = digit_model(dtok, seed=1)
    targets = _targets(people, "Gender=uniform", "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, rows=2, tables=6, seed=3, batch_size=3)
    written = write_tables(model, dtok, people, 2, 6, 3, exact=True, batch_size=3, progress=False, draws="iid")
    got = fields.marginals(model, contexts)
    columns = [c.name for c in people.columns]
    for f, q in zip(contexts.fields, got):
        cell = written.cells[f.row - 1][columns.index(f.key.column)]
        exact = cell.exact[(f.key.position or 1) - 1].double()  # [tables, values]
        want = exact.mean(0) / exact.mean(0).sum()
        assert len(f.suffixes) == exact.shape[0]
        torch.testing.assert_close(q.double(), want, atol=1e-5, rtol=1e-4)


def test_shared_runs_read_every_prefix_from_a_longer_sequence():
    """A sequence that is a prefix of another is read from the longer one's run; others run."""
    seqs = [(1, 2), (1, 2, 3, 4), (1, 2, 3), (1, 5), (9,), (1, 2, 3)]
    runs, where = fields._shared_runs(seqs)
    assert sorted(runs) == [(1, 2, 3, 4), (1, 5), (9,)]
    for seq, run in zip(seqs, where):
        assert runs[run][:len(seq)] == seq


def test_short_sequences_run_apart_only_when_that_saves_tokens():
    """Two batches when padding every sequence to the longest would run a quarter more tokens."""
    assert fields._batches([10, 10, 10]) == [[0, 1, 2]]
    assert fields._batches([9, 10, 8, 10]) == [[0, 1, 2, 3]]  # 40 tokens padded against 38 split: not worth it
    assert fields._batches([10, 3, 3, 3, 10]) == [[1, 2, 3], [0, 4]]  # 50 padded against 29


def test_run_logits_read_positions_in_the_order_asked_across_batches():
    """``at`` returns each asked (sequence, position) in the order asked, whichever batch holds it."""
    short, long = torch.randn(2, 3, 5), torch.randn(2, 6, 5)  # [B, S, V]
    logits = fields._RunLogits([short, long], [(1, 0), (0, 0), (1, 1), (0, 1)])  # sequences 0-3
    got = logits.at([2, 1, 0, 3, 2], [5, 0, 1, 2, 0])
    want = torch.stack([long[1, 5], short[0, 0], long[0, 1], short[1, 2], long[1, 0]])
    assert torch.equal(got, want)


def test_readout_from_shared_runs_equals_each_sequence_run_alone(dtok, people):
    """Every field's probabilities and drawn log-probabilities read from shared runs in split
    batches equal those of each field's sequences teacher-forced on their own."""
    model = digit_model(dtok, seed=1)
    targets = _targets(people, "Gender=uniform", "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, rows=2, tables=5, seed=4, batch_size=5)
    with torch.no_grad():
        got = fields.readout(model, contexts)
        cache, start = fields.prompt_cache(model, contexts.prompt)
        for f, (probs, drawn) in zip(contexts.fields, got):
            seqs = fields._sequences(f)
            one_batch = fields.teacher_forced(model, cache, start, seqs)[0]  # no sharing, no split
            alone = fields._RunLogits([one_batch], [(0, b) for b in range(len(seqs))])
            want_probs, want_drawn = fields._reader(f)(alone, list(range(len(seqs))), f)
            torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(drawn, want_drawn, atol=1e-4, rtol=1e-5)
    runs, _where = fields._shared_runs([s for f in contexts.fields for s in fields._sequences(f)])
    assert len(fields._batches([len(r) for r in runs])) == 2  # the test reads across both batches


def test_readout_of_a_bfloat16_model_is_float32_near_its_float32_readout(dtok, people):
    """The teacher-forced logits stay in the model's dtype and the readers cast the rows they
    pick: a bfloat16 model's readout comes out in float32, near the float32 model's (bfloat16
    rounding of weights and activations), and its gradient reaches a float32 leaf."""
    model = digit_model(dtok, seed=1)
    targets = _targets(people, "Gender=uniform", "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, rows=2, tables=4, seed=4, batch_size=4)
    with torch.no_grad():
        want = fields.readout(model, contexts)
    half = copy.deepcopy(model).to(torch.bfloat16)
    scale = torch.ones((), requires_grad=True)  # a float32 leaf the bfloat16 logits depend on
    handle = half.lm_head.register_forward_hook(lambda _m, _i, out: out * scale.to(out.dtype))
    try:
        got = fields.readout(half, contexts)
    finally:
        handle.remove()
    for (probs, drawn), (want_probs, _want_drawn) in zip(got, want):
        assert probs.dtype == torch.float32 and drawn.dtype == torch.float32
        torch.testing.assert_close(probs, want_probs, atol=0.03, rtol=0)
    sum(p[:, 0].sum() for p, _d in got).backward()  # the first option's probability: not constant
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad != 0


def test_drawn_context_tokens_and_their_log_probability(dtok, people):
    """The tokens a fit reweights by are exactly those the model drew in the cells before the
    field (the writer's forced tokens left out), and their log-probability is what a direct
    forward pass over the prompt and the context gives."""
    model = digit_model(dtok, seed=1)
    targets = _targets(people, "Gender=uniform", "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, rows=2, tables=6, seed=3, batch_size=3)
    written = write_tables(model, dtok, people, 2, 6, 3, exact=False, batch_size=3, progress=False, draws="iid")
    columns = [c.name for c in people.columns]
    start = len(contexts.prompt)
    with torch.no_grad():
        read = fields.readout(model, contexts)
        for f, (_p, drawn_logp) in zip(contexts.fields, read):
            cell = (f.row - 1, columns.index(f.key.column))
            before = [(r, c) for r in range(f.row) for c in range(len(columns)) if (r, c) < cell]
            assert len(f.sampled) == len(f.suffixes) == 6
            for t, (suffix, drawn) in enumerate(zip(f.suffixes, f.sampled)):
                assert [suffix[j] for j in drawn] == [x for r, c in before for x in written.cells[r][c].tokens[t]]
                logp = torch.log_softmax(model(input_ids=torch.tensor([contexts.prompt + suffix])).logits[0], -1)
                direct = sum(float(logp[start + j - 1, suffix[j]]) for j in drawn)
                assert float(drawn_logp[t]) == pytest.approx(direct, abs=1e-3)


def test_reweighted_marginal_is_exact_when_contexts_come_in_their_proportions():
    """Self-normalised importance weights: contexts drawn under one model in exactly its
    proportions (3 of context A, 1 of B at 0.75 / 0.25), weighted by p_new / p_old, give the
    marginal under the new model's proportions (0.4 / 0.6) exactly."""
    per_table = torch.tensor([[0.9, 0.1]] * 3 + [[0.2, 0.8]])  # [tables, values]: A's and B's
    old, new = torch.tensor([0.75] * 3 + [0.25]), torch.tensor([0.4] * 3 + [0.6])
    got = fields.marginal(per_table, new.log() - old.log())
    torch.testing.assert_close(got, 0.4 * per_table[0] + 0.6 * per_table[3])
    torch.testing.assert_close(fields.marginal(per_table), per_table.mean(0))
    assert fields.effective_tables(torch.zeros(4)) == pytest.approx(4)
    assert fields.effective_tables(torch.tensor([0.0, -50.0, -50.0, -50.0])) == pytest.approx(1)


def test_the_fit_keeps_the_share_of_cells_holding_no_value():
    """The fit's extra outcome "none of the values" is held at the unedited share: the extended
    target sums to 1 and an edit that empties the cell pays for it even where the renormalised
    distribution is exactly the target."""
    target = torch.tensor([0.5, 0.5, 0.0])
    t, q = methods._with_elsewhere(target, torch.tensor([0.35, 0.35, 0.0]), 0.3)
    torch.testing.assert_close(t, torch.tensor([0.35, 0.35, 0.0, 0.3]))
    assert float(methods.kl_to(t, q)) == pytest.approx(0.0, abs=1e-6)
    broken = methods.kl_to(*methods._with_elsewhere(target, torch.tensor([0.01, 0.01, 0.0]), 0.3))
    assert float(broken) > 1.0 and float(methods.kl_to(target, fields.marginal(torch.tensor([[0.01, 0.01, 0.0]])))) < 1e-6


def test_target_reach_is_the_exact_marginals_sum():
    dists = {"row 1 / Gender": {"exact_marginal": [0.2, 0.3, 0.0]}, "row 1 / Age digit 1": {"exact_marginal": [0.1] * 9}}
    targets = _targets(load_template("people"), "Gender=uniform", "Age.digit1=uniform")
    assert job._target_reach(dists, targets, range(1, 2)) == pytest.approx((0.5 + 0.9) / 2)


def test_off_target_mass_is_the_distribution_outside_the_targets_support():
    """The off-target mass sums the values the target excludes, and that mass alone (the rest
    exactly on target) puts the JS distance at about the square root of its half."""
    dists = {"row 1 / Gender": {"distribution": [0.5, 0.4, 0.1]},
             "row 1 / Age digit 1": {"distribution": [0.01, 0.0, *[0.198] * 5, 0.0, 0.0, 0.0]}}
    people = load_template("people")
    targets = _targets(people, "Gender=Male:0.5,Female:0.5", "Age.digit1=uniform:2-6")
    assert job._target_off(dists, targets, range(1, 2)) == pytest.approx((0.1 + 0.01) / 2)
    assert job._target_js({"row 1 / Age digit 1": dists["row 1 / Age digit 1"]}, targets[1:], range(1, 2)) \
        == pytest.approx((0.01 / 2) ** 0.5, rel=0.01)


def test_js_loss_is_the_reports_js_distance():
    """The fit's JS term equals the report's Jensen-Shannon distance (the reference,
    ``stats.js_distance``) on random distributions, with and without values the target excludes."""
    import numpy as np

    from prunescope.probe import stats

    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    for _ in range(5):
        q = torch.softmax(3 * torch.randn(8, generator=gen, dtype=torch.float64), 0)
        want = stats.js_distance(q.numpy(), target.numpy())
        assert float(methods.js_to(target, q)) == pytest.approx(want, abs=1e-6)
    assert float(methods.js_to(target, target)) == pytest.approx(0.0, abs=1e-4)
    assert np.isfinite(float(methods.js_to(target, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))))


def test_js_loss_pushes_a_lone_off_target_mass_harder_than_the_kl_but_not_against_the_shape():
    """With the target's values met exactly and 0.06% of the mass m on an excluded value, the JS
    distance reads sqrt(m / 2) and pulls that value's logit down over ten times
    harder than the KL (whose pull is about the value's probability). With the shape off as well,
    the stray pull against the shape's is within a factor 1-2 of the KL's: the square root scales
    a field's whole gradient, the divergence under it weighs the two errors much as the KL does."""
    target = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0])

    def grads(logits: list[float]) -> dict[str, torch.Tensor]:
        out = {}
        for name, loss in methods.TARGET_LOSSES.items():
            z = torch.tensor(logits, requires_grad=True)
            loss(target, torch.softmax(z, 0)).backward()
            out[name] = z.grad
        return out

    q = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 0.0, -6.0]), 0)
    assert float(methods.js_to(target, q)) == pytest.approx(float((q[4] / 2).sqrt()), rel=0.01)
    lone = grads([0.0, 0.0, 0.0, 0.0, -6.0])
    assert float(lone["js"][4]) > 10 * float(lone["kl"][4]) > 0
    both = grads([0.0, 0.0, 0.0, 0.05, -6.0])
    ratio = {name: float(g[4] / g[3]) for name, g in both.items()}  # stray pull against the shape's
    assert ratio["kl"] < ratio["js"] < 2 * ratio["kl"]


def test_fit_with_the_js_loss_moves_the_field_and_says_so(dtok, people):
    """A fit on the JS distance brings the field closer by that distance, and its trace says
    which loss its target column holds; an unknown loss is refused before fitting."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted, unrelated = [torch.tensor(targets[0].probs)], torch.randint(0, 300, (2, 16))
    edit, trace = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=8, lr=0.2, kl_weight=0.0,
                              max_norm=2.0, loss="js")
    assert trace.loss == "js" and trace.target_kl[-1] < 0.6 * trace.target_kl[0]  # a distance: ~sqrt(KL)
    with applied(model, edit):
        (q,) = fields.marginals(model, contexts)
    assert float(q[3].detach()) > 0.5
    with pytest.raises(ValueError, match="loss 'l2' is not one of kl, js"):
        methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=1, loss="l2")


def test_power_mean_is_the_mean_at_one_and_weighs_the_farthest_template_more_above():
    """The templates' terms combine as their mean at power 1; above it the result lies between the
    mean and the maximum, towards the maximum as the power grows, each term's gradient in the
    ratio (term / other term) ** (power - 1); tiny or zero terms give finite gradients."""
    def combined(values: list[float], power: float) -> tuple[float, torch.Tensor]:
        x = torch.tensor(values, requires_grad=True)
        out = methods.power_mean(x, power)
        out.backward()
        return float(out.detach()), x.grad

    assert combined([0.1, 0.3], 1.0)[0] == pytest.approx(0.2)
    assert combined([0.1, 0.3], 2.0)[0] == pytest.approx(0.05 ** 0.5)
    assert 0.29 < combined([0.1, 0.3], 64.0)[0] < 0.3
    _value, grad = combined([0.1, 0.3], 4.0)
    assert float(grad[1] / grad[0]) == pytest.approx(27.0, rel=1e-4)
    assert combined([1e-6, 2e-6], 32.0)[0] == pytest.approx(2e-6 * 0.5 ** (1 / 32), rel=1e-4)
    for values in ([0.0, 0.0], [0.0, 0.2], [-1e-9, 0.1]):
        _value, grad = combined(values, 4.0)
        assert torch.isfinite(grad).all()


def test_fit_on_several_templates_combines_their_terms_by_the_power_mean(dtok, people):
    """With ``template_power`` the fit's first target term is the power mean of each template's
    own (first step: no edit yet), the trace records the power and each template's term before
    the last step; a power below 1 or not finite is refused before fitting."""
    from prunescope.edit.rewordings import fit_templates

    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    a, b = [fields.record_contexts(model, dtok, t, targets, 1, 3, 0, 3) for t in fit_templates(people, 1)]
    unrelated = torch.randint(0, 300, (2, 16))

    def fitted(contexts, power=1.0, steps=1):
        return methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2, template_power=power)[1]

    ta, tb = fitted(a).target_kl[0], fitted(b).target_kl[0]
    both = fitted([a, b], 4.0)
    assert both.target_kl[0] == pytest.approx(((ta ** 4 + tb ** 4) / 2) ** 0.25, rel=1e-5)
    assert both.template_power == 4.0 and both.last_templates == pytest.approx((ta, tb), rel=1e-5)
    assert fitted(a, 4.0).target_kl[0] == pytest.approx(ta, rel=1e-5)  # one template: its own term
    three = fitted([a, b], 4.0, steps=3)
    assert len(three.last_templates) == 2 and three.last_templates != pytest.approx((ta, tb), rel=1e-5)
    assert three.target_kl[-1] == pytest.approx(float(methods.power_mean(torch.tensor(three.last_templates), 4.0)),
                                                rel=1e-5)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="template_power must be a finite number >= 1"):
            fitted([a, b], bad)


def test_recorded_contexts_know_their_instruction_and_dropout_thins_only_it(dtok, people):
    """The recorded prompt's instruction span decodes to the instruction; leaving its tokens out
    keeps the chat markup and the table header, drops about the rate asked for (at least one
    token kept), draws from the generator given, and at rate 0 (or with no span) changes nothing."""
    contexts = fields.record_contexts(digit_model(dtok), dtok, people, _targets(people, "Gender=uniform"), 1, 2, 0, 2)
    first, end = contexts.instruction
    assert dtok.decode(list(contexts.prompt[first:end])) == people.instruction(1)
    ids, span, words = fields.encode_prompt(dtok, "no such text", people.instruction(1), False)
    assert span == (0, 0) and words == () and ids == dtok("no such text", add_special_tokens=False)["input_ids"]

    class Slow:  # a slow tokenizer: no offsets, the same ids
        def __call__(self, text: str, add_special_tokens: bool, return_offsets_mapping: bool = False):
            if return_offsets_mapping:
                raise NotImplementedError("no offsets")
            return dtok(text, add_special_tokens=add_special_tokens)

    text = "before " + people.instruction(1)
    assert fields.encode_prompt(Slow(), text, people.instruction(1), False) == (
        dtok(text, add_special_tokens=False)["input_ids"], (0, 0), ())

    def thinned(rate: float, seed: int = 0) -> fields.Contexts:
        return fields.with_thinned_instruction(contexts, rate, torch.Generator().manual_seed(seed))

    assert thinned(0.0) is contexts
    unknown = fields.Contexts(contexts.prompt, contexts.fields)  # no instruction span
    assert fields.with_thinned_instruction(unknown, 0.5, torch.Generator()).prompt == contexts.prompt
    n = end - first
    for rate in (0.2, 0.5):
        out = thinned(rate)
        a, b = out.instruction
        assert a == first and out.prompt[:a] == contexts.prompt[:first] and out.prompt[b:] == contexts.prompt[end:]
        assert out.fields is contexts.fields and 0 < b - a < n
        rest = iter(contexts.prompt[first:end])
        assert all(t in rest for t in out.prompt[a:b])  # what is kept is a subsequence of the instruction
        assert abs((n - (b - a)) / n - rate) < 0.25
    assert thinned(0.5, 1).prompt == thinned(0.5, 1).prompt != thinned(0.5, 2).prompt
    assert thinned(0.99999).instruction[1] - first == 1  # all drawn out: one kept


def _word_pieces(contexts: fields.Contexts) -> list[tuple[int, ...]]:
    first, end = contexts.instruction
    starts = list(contexts.words) + [end - first]
    return [contexts.prompt[first + a:first + b] for a, b in zip(starts, starts[1:])]


def test_instruction_words_and_thinning_whole_words(dtok, people):
    """The recorded instruction's word starts cut it into its words (each with the space before
    it, punctuation kept with its word); thinning by word leaves whole words out (what is kept
    is a subsequence of the words, about the rate, at least one) and knows its own words; a
    tokenizer whose offsets leave the spaces out starts a word after each gap; an unknown unit
    is refused."""
    contexts = fields.record_contexts(digit_model(dtok), dtok, people, _targets(people, "Gender=uniform"), 1, 2, 0, 2)
    words = re.findall(r"\s*\S+", people.instruction(1))
    assert [dtok.decode(list(p)) for p in _word_pieces(contexts)] == words and len(words) > 10
    for rate in (0.2, 0.5):
        out = fields.with_thinned_instruction(contexts, rate, torch.Generator().manual_seed(3), "word")
        kept = [dtok.decode(list(p)) for p in _word_pieces(out)]
        rest = iter(words)
        assert all(w in rest for w in kept) and 0 < len(kept) < len(words)
        assert abs((len(words) - len(kept)) / len(words) - rate) < 0.25
        assert out.prompt[out.instruction[1]:] == contexts.prompt[contexts.instruction[1]:]
    one = fields.with_thinned_instruction(contexts, 0.99999, torch.Generator(), "word")
    assert len(_word_pieces(one)) == 1 and dtok.decode(list(_word_pieces(one)[0])) in words
    assert fields._word_starts("ab cd,e", [(0, 2), (3, 5), (5, 6), (6, 7)]) == (0, 1)  # spaces outside the tokens
    with pytest.raises(ValueError, match="unit 'letter' is not one of token, word"):
        fields.with_thinned_instruction(contexts, 0.2, torch.Generator(), "letter")


def test_fit_with_prompt_dropout_reads_thinned_prompts_and_says_so(dtok, people):
    """With ``prompt_dropout`` the first step's target term is read after a thinned instruction
    (so it differs from the term on the recorded prompt), the trace records the rate, the
    contexts handed in are left as recorded, and a rate outside [0, 1) is refused."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 3, 0, 3)
    unrelated = torch.randint(0, 300, (2, 16))

    def fitted(rate: float, steps: int = 1, unit: str = "token"):
        return methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2, prompt_dropout=rate,
                           prompt_dropout_unit=unit)[1]

    recorded = contexts.prompt
    plain, thinned = fitted(0.0), fitted(0.5)
    assert plain.prompt_dropout == 0.0 and thinned.prompt_dropout == 0.5
    assert thinned.target_kl[0] != pytest.approx(plain.target_kl[0], rel=1e-4)
    assert fitted(0.5).target_kl == thinned.target_kl  # the draws come from the seed
    assert contexts.prompt == recorded
    by_word = fitted(0.5, unit="word")
    assert by_word.prompt_dropout_unit == "word" and plain.prompt_dropout_unit == "token"
    assert by_word.target_kl[0] != pytest.approx(plain.target_kl[0], rel=1e-4)
    with pytest.raises(ValueError, match="prompt_dropout_unit 'line' is not one of token, word"):
        fitted(0.5, unit="line")
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="prompt_dropout must lie in"):
            fitted(bad)
    with pytest.raises(ValueError, match="prompt_dropout and reweight do not combine"):
        methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=1, prompt_dropout=0.1, reweight=True)


def test_fit_average_last_keeps_the_mean_of_the_last_steps_vectors(dtok, people):
    """With ``average_last`` K the edit kept is the mean of the vectors after each of the last K
    steps: with a constant step size and fixed contexts a fit of n steps is the first n steps of
    a longer one, so it equals the mean of the fits of steps-K+1 ... steps; K = 1 is the last
    step's; K outside 1..steps is refused."""
    model = digit_model(dtok, seed=3)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 3, 0, 3)
    unrelated = torch.randint(0, 300, (2, 16))

    def vectors(steps: int, last: int = 1) -> list[torch.Tensor]:
        edit, trace = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2, average_last=last)
        assert trace.average_last == last
        return [e.add for e in edit.layers]

    alone = [vectors(n) for n in (2, 3, 4)]
    mean = [torch.stack(v).mean(0) for v in zip(*alone)]
    for got, want in zip(vectors(4, 3), mean):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(alone[0][0], alone[2][0])  # the steps moved: the mean is not any one of them
    for got, want in zip(vectors(4, 1), alone[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in (0, 5, 1.5):
        with pytest.raises(ValueError, match=r"average_last must be an integer in 1..steps \(4\)"):
            vectors(4, bad)


def test_a_digit_no_table_reached_is_a_clear_error(dtok, people):
    from prunescope.errors import PrunescopeError

    model = digit_model(dtok, seed=1)  # writes no digit in the first row's Age cell of these tables
    with pytest.raises(PrunescopeError, match="reached Age digit 3 at row 1"):
        fields.record_contexts(model, dtok, people, _targets(people, "Age.digit3=uniform"), 1, 3, 3, 3)


def test_gradients_reach_the_added_vector(dtok, people):
    model = digit_model(dtok)
    model.requires_grad_(False)
    contexts = fields.record_contexts(model, dtok, people, _targets(people, "Gender=uniform"), 1, 3, 0, 3)
    vector = torch.zeros(model.config.hidden_size, requires_grad=True)
    with applied(model, Edit([LayerEdit(1, add=vector)])):
        (q,) = fields.marginals(model, contexts)
    methods.kl_to(torch.tensor([0.0, 1.0, 0.0]), q).backward()
    assert vector.grad is not None and float(vector.grad.abs().sum()) > 0


def test_fit_moves_the_field_towards_the_target(dtok, people):
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    unrelated = torch.randint(0, 300, (2, 16))
    edit, trace = methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], unrelated, steps=8,
                              lr=0.2, kl_weight=0.0, max_norm=2.0)
    assert trace.target_kl[-1] < 0.5 * trace.target_kl[0]
    with applied(model, edit):
        (q,) = fields.marginals(model, contexts)
    assert float(q[3].detach()) > 0.5


def test_units_fit_moves_the_field_towards_the_target(dtok, people):
    """New MLP units fitted beside the vectors with the vector fit's loss: the target KL falls,
    the field moves, the units' gate and up rows moved away from their draw (they learn when to
    fire, not only what to write)."""
    from prunescope.edit.hooks import new_units

    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    unrelated = torch.randint(0, 300, (2, 16))
    edit, trace = methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], unrelated, steps=8,
                              lr=0.2, kl_weight=0.0, units=3, seed=5)
    assert trace.target_kl[-1] < 0.5 * trace.target_kl[0]
    assert [e.units.count for e in edit.layers] == [3, 3] and all(e.add is not None for e in edit.layers)
    with applied(model, edit):
        (q,) = fields.marginals(model, contexts)
    assert float(q[3].detach()) > 0.5
    drawn = new_units(model, 0, 3, torch.Generator().manual_seed(5))  # the fit's first layer starts here
    assert not torch.allclose(edit.layers[0].units.gate, drawn.gate.detach())


def test_logistic_gate_separates_two_clouds_and_opens_on_one():
    """The classifier separates two shifted Gaussian clouds (1 positive per 10 negatives, the
    classes weighted alike); a gate built from it is open on held-out positives and shut on
    held-out negatives; at the returned weights the loss's gradient is about zero (an optimum)."""
    from prunescope.edit.hooks import Gate

    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(16)
    shift[:3] = 2.0
    def draw(n, sign):  # noqa: E306
        return torch.randn(n, 16, generator=g) + sign * shift + 5.0
    pos, neg = draw(200, 1), draw(2000, -1)
    w, b = methods.logistic(pos, neg, l2=1e-3)
    test_pos, test_neg = draw(500, 1), draw(500, -1)
    assert float((test_pos @ w + b > 0).float().mean()) > 0.95 and float((test_neg @ w + b < 0).float().mean()) > 0.95
    # the optimum: the class-balanced loss plus the penalty on standardized weights is stationary
    x = torch.cat([pos, neg]).double()
    std = x.std(0)
    ws = (w.double() * std).requires_grad_(True)  # the standardized weights
    bs = torch.tensor(b, dtype=torch.double, requires_grad=True)
    y = torch.cat([torch.ones(200), torch.zeros(2000)]).double()
    weight = torch.where(y > 0, 0.5 / 200, 0.5 / 2000)
    z = (x - x.mean(0)) / std @ ws + bs + float(x.mean(0) / std @ ws.detach())
    loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).sum()
    (loss + 1e-3 * ws.pow(2).sum()).backward()
    assert float(ws.grad.abs().max()) < 1e-4
    gate = Gate(2.0 * w, 2.0 * b, 8.0)

    def ramp(x):  # what the gate's two units write per unit of the vector, as the hooks compute it
        return hooks._unit_values(gate.units(torch.ones(16)), torch.nn.functional.silu, x).sum(-1)

    assert float((ramp(test_pos) > 0.5).float().mean()) > 0.9 and float((ramp(test_neg) > 0.5).float().mean()) < 0.05


def test_logistic_weights_each_negative_group_alike():
    """Negatives given as groups: a small group near the positives (50 points) counts as much as a
    large one far away (2,000), so the classifier shuts on far more of it than when the same
    points come as one negative tensor (where 50 of 2,050 weigh little); one group is exactly
    the plain call."""
    g = torch.Generator().manual_seed(0)

    def cloud(n, center):
        return torch.randn(n, 16, generator=g) + center

    c_pos, c_text = torch.zeros(16), torch.zeros(16)
    c_pos[:3], c_text[:3] = 2.0, -2.0
    c_other = c_pos.clone()
    c_other[5] = -1.5  # another table: close to the positives, apart along one direction
    pos, text, other = cloud(200, c_pos), cloud(2000, c_text), cloud(50, c_other)
    test_pos, test_other = cloud(500, c_pos), cloud(500, c_other)

    def opens(w, b, x):
        return float((x @ w + b > 0).float().mean())

    w_one, b_one = methods.logistic(pos, torch.cat([text, other]))
    w_groups, b_groups = methods.logistic(pos, [text, other])
    assert opens(w_one, b_one, test_other) > 0.8  # the small group is mostly let through
    assert opens(w_groups, b_groups, test_other) < opens(w_one, b_one, test_other) - 0.3
    assert opens(w_groups, b_groups, test_pos) > 0.75
    w_plain, b_plain = methods.logistic(pos, text)
    w_listed, b_listed = methods.logistic(pos, [text])
    assert torch.equal(w_plain, w_listed) and b_plain == b_listed


def _products(folder):
    """A table unlike the people template (a --gate-negative): products, category and price."""
    path = folder / "products.yaml"
    path.write_text("name: products\nprompt: |-\n  List {rows} random products as a markdown table.\n  {table}\n"
                    "columns:\n  - {name: Product, type: text, max_tokens: 4}\n"
                    "  - {name: Category, type: choice, choices: [Food, Toys, Books]}\n"
                    "  - {name: Price, type: digits, min_length: 1, max_length: 2}\n")
    return path


def test_gates_trained_against_another_table_stay_shut_on_it(dtok, people, tmp_path):
    """gate_probe with another template's tables among the negatives: the gates shut at the
    positions of those tables they were trained on, and on new tables of that template open far
    less than gates trained against text alone (on a tiny random model two tables' positions are
    much alike and either gate opens on under two thirds of a new table of its own template);
    on new tables of the fitted template they open more than on the other's."""
    model = digit_model(dtok, seed=2)
    wanted = _targets(people, "Gender=uniform")
    contexts = fields.record_contexts(model, dtok, people, wanted, 1, 8, 0, 4)
    products = load_template(_products(tmp_path))
    fields_of = _targets(products, "Category=uniform")
    negatives = [fields.record_contexts(model, dtok, products, fields_of, 1, 8, 1, 4)]
    text = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    plain = methods.gate_probe(model, contexts, text, [0, 1])
    specific = methods.gate_probe(model, contexts, text, [0, 1], negatives)
    trained = methods.table_inputs(model, negatives, [0, 1])
    other = methods.table_inputs(model, [fields.record_contexts(model, dtok, products, fields_of, 1, 8, 2, 4)], [0, 1])
    own = methods.table_inputs(model, [fields.record_contexts(model, dtok, people, wanted, 1, 8, 3, 4)], [0, 1])
    for i in (0, 1):
        assert methods.gate_share(model, i, specific[i], trained[i]) < 0.05
        assert methods.gate_share(model, i, specific[i], other[i]) < methods.gate_share(model, i, plain[i], other[i]) - 0.2
        assert methods.gate_share(model, i, specific[i], own[i]) > methods.gate_share(model, i, specific[i], other[i])


def test_gated_fit_moves_the_field_and_its_gates_stay_as_given(dtok, people):
    """The gated fit (gates from gate_probe on the recorded tables against random text) lowers
    the target KL and moves the field; each layer keeps its gate unchanged (only the vectors are
    fitted); gates with units, or for other layers, are refused."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    unrelated = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    gates = methods.gate_probe(model, contexts, unrelated, [0, 1])
    table, text = methods.table_inputs(model, contexts, [0, 1]), methods.text_inputs(model, unrelated, [0, 1])
    # a random tiny model's tables are not far from random text: the gates open more on the tables
    assert all(methods.gate_share(model, i, gates[i], table[i]) > methods.gate_share(model, i, gates[i], text[i])
               for i in (0, 1))
    before = {i: g.weight.clone() for i, g in gates.items()}
    edit, trace = methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], unrelated, steps=8,
                              lr=0.2, kl_weight=0.0, max_norm=2.0, gates=gates)
    assert trace.target_kl[-1] < 0.5 * trace.target_kl[0]
    assert all(torch.equal(e.gate.weight, before[e.layer]) and (e.gate.bias, e.gate.span) ==
               (gates[e.layer].bias, gates[e.layer].span) for e in edit.layers)
    with applied(model, edit):
        (q,) = fields.marginals(model, contexts)
    assert float(q[3].detach()) > 0.5
    with pytest.raises(ValueError, match="one gate per fitted layer"):
        methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], unrelated, steps=1, gates={0: gates[0]})
    with pytest.raises(ValueError, match="gates and units do not combine"):
        methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], unrelated, steps=1, gates=gates, units=2)


def test_a_units_fit_starts_as_the_vector_fit(dtok, people):
    """The units start writing nothing, so the first step moves the vectors exactly as the fit
    without units does; by the second the units' writing changes the vectors' gradient."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 3, 0, 3)
    wanted, unrelated = [torch.tensor(targets[0].probs)], torch.randint(0, 300, (2, 16))

    def vectors(steps: int, units: int) -> torch.Tensor:
        edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2, units=units)
        return torch.stack([e.add for e in edit.layers])

    torch.testing.assert_close(vectors(1, 2), vectors(1, 0), atol=0, rtol=0)
    assert not torch.allclose(vectors(2, 2), vectors(2, 0))


def test_contrast_ablation_and_weight_edits(dtok, people):
    model = digit_model(dtok, seed=4)
    targets = _targets(people, "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted = [torch.tensor(targets[0].probs)]
    vectors = methods.contrast(model, contexts, wanted, [0, 1])
    assert set(vectors) == {0, 1} and all(v.shape == (model.config.hidden_size,) for v in vectors.values())
    caa = methods.caa_edit(vectors, 0.5, {0: 2.0, 1: 4.0})
    assert [round(float(e.add.norm()), 5) for e in caa.layers] == [1.0, 2.0]  # strength x residual norm
    ablate = methods.ablate_edit(vectors, 1.0)
    assert all(abs(float(e.direction.norm()) - 1) < 1e-5 for e in ablate.layers)
    # the rank-one edit writes exactly v for each targeted field's mean key, whatever the covariance
    both = _targets(people, "Age.digit1=uniform:2-6", "Gender=uniform")
    contexts2 = fields.record_contexts(model, dtok, people, both, 1, 4, 0, 4)
    v = {1: torch.randn(model.config.hidden_size)}
    keys = methods._field_keys(model, contexts2, [1])[1]  # [inter, 2 fields]
    writer = model.get_submodule(methods.mlp_writer_name(model, 1))
    for null in (False, True):
        w = methods.weight_edit(model, contexts2, v, torch.randint(0, 300, (4, 16)), null=null)
        before = writer(keys.T)  # [2, hidden]
        weight = writer.weight.detach().clone()
        with apply.added_to_weights(model, w.named(model)):
            after = writer(keys.T)
        assert torch.equal(writer.weight, weight)  # restored after the block
        for f in range(2):
            torch.testing.assert_close(after[f] - before[f], v[1], atol=2e-3, rtol=1e-3)


def test_cli_edit_writes_the_report_and_a_folded_model(digit_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    text = _unrelated_text(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["-q", "edit", str(digit_model_dir), "--target", "Age.digit1=uniform:2-6", "--target", "Gender=uniform",
                   "--method", "fit,caa,ablate,weight,weight-null", "--layers", "0-1", "--steps", "2",
                   "--fit-tables", "3", "--fit-rewordings", "1", "--measure-tables", "3", "--strength", "1",
                   "--eval-text", str(text),
                   "--eval-tokens", "512", "--eval-seqlen", "16", "--save", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    kinds = [r["kind"] for r in report["results"]]
    assert kinds == ["fit", "caa", "ablate", "weight", "weight-null"]
    schema = ("kind", "strength", "target_js_before", "target_js_after", "target_js_heldout", "ppl_before",
              "ppl_after", "kl_unrelated", "top1_agreement", "seconds")
    for r in report["results"]:
        assert all(k in r for k in schema) and "sampled_in_band" in r
        assert 0 <= r["target_js_after"] <= 1 and 0 <= r["top1_agreement"] <= 1
        assert 0 <= r["target_js_noise"] <= 1  # bootstrap over the 3 measured tables
        assert 0 < r["target_reach_before"] <= 1 + 1e-6 and 0 <= r["target_reach"] <= 1 + 1e-6
        assert all(0 <= r[k] <= 1 + 1e-6 for k in ("target_off_before", "target_off", "target_off_heldout"))
    assert len(report["heldout_templates"]) >= 3
    assert report["fit_templates"] == ["people", "people/fit-1"]
    assert report["options"]["steps"] == 2 and report["options"]["lr_final"] == 1.0
    assert report["options"]["fit_tables"] == 3 and report["options"]["strengths"] == [1.0]
    markdown = (out / "report.md").read_text()
    assert "Settings: steps 2, lr 0.03, lr-final 1.0, kl-weight 10.0" in markdown
    assert (out / "pareto.png").stat().st_size > 1000 and "| fit |" in markdown and "held-out off-target" in markdown
    norms = report["cell_norms"]
    cells = {f"{t} / row 1 / {f}" for t in ("people", "people/fit-1", *report["heldout_templates"])
             for f in ("Gender", "Age digit 1")}
    assert norms["edited"] == [0, 1] and set(norms["ratio"]) == cells
    assert all(len(r) == 2 and all(v > 0 for v in r) for r in norms["ratio"].values())  # the digit model's 2 layers
    assert "## Residual norm at the targeted cells" in markdown and "| people/fit-1 / row 1 / Gender |" in markdown
    assert (out / "cell-norms.png").stat().st_size > 1000
    assert "fitted on templates: people, people/fit-1;" in markdown
    assert "Effective tables of the importance weights (not used" in markdown  # off by default
    folded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert folded.config.mlp_bias  # the fitted vector lives in down_proj's bias


def test_cli_units_fit_saves_a_wider_mlp(digit_model_dir, tmp_path):
    """``--method units --save``: the units fit runs, is reported with its own trace, and the
    saved folder is a plain transformers model whose MLP is --units wider."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(digit_model_dir).config.intermediate_size
    out = tmp_path / "out"
    rc = cli.main(["-q", "edit", str(digit_model_dir), "--target", "Gender=uniform", "--method", "units,fit",
                   "--units", "2", "--layers", "0-1", "--steps", "2", "--fit-tables", "2", "--fit-rewordings", "1",
                   "--measure-tables", "2", "--strength", "1", "--eval-text", str(_unrelated_text(tmp_path)),
                   "--eval-tokens", "512", "--eval-seqlen", "16", "--save", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["kind"] for r in report["results"]] == ["units", "fit"]
    assert report["options"]["units"] == 2
    assert len(report["units_trace"]["target_kl"]) == len(report["fit_trace"]["target_kl"]) == 2
    assert "## Units fit" in (out / "report.md").read_text()
    folded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert folded.config.intermediate_size == base + 2 and folded.config.mlp_bias  # the vectors: biases


def test_cli_gated_fit_reports_its_gates_and_saves_a_wider_mlp(digit_model_dir, tmp_path):
    """``--method gated --match-ppl 1 --save``: the gates are trained and reported (where they open
    on each sample), the gated fit has its own trace (here on the JS loss, which the report
    names), the match stops at the fitted strength, and the saved folder is a plain transformers
    model two units wider per layer, with MLP biases."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(digit_model_dir).config.intermediate_size
    out = tmp_path / "out"
    rc = cli.main(["-q", "edit", str(digit_model_dir), "--target", "Gender=uniform", "--method", "gated",
                   "--layers", "0-1", "--steps", "2", "--fit-tables", "2", "--fit-rewordings", "1",
                   "--measure-tables", "2", "--match-ppl", "1000", "--eval-text", str(_unrelated_text(tmp_path)),
                   "--eval-tokens", "512", "--eval-seqlen", "16", "--fit-loss", "js", "--template-power", "2",
                   "--prompt-dropout", "0.2", "--prompt-dropout-unit", "word", "--average-last", "2", "--save",
                   "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    (result,) = report["results"]
    assert report["options"]["fit_loss"] == "js" and report["gated_trace"]["loss"] == "js"
    assert report["options"]["template_power"] == 2.0 and report["gated_trace"]["template_power"] == 2.0
    assert report["options"]["prompt_dropout"] == 0.2 and report["gated_trace"]["prompt_dropout"] == 0.2
    assert report["options"]["prompt_dropout_unit"] == report["gated_trace"]["prompt_dropout_unit"] == "word"
    assert report["options"]["average_last"] == report["gated_trace"]["average_last"] == 2
    assert len(report["gated_trace"]["last_templates"]) == len(report["fit_templates"]) == 2
    assert result["kind"] == "gated" and result["strength"] == 1.0 and result["matched_ppl_change"] is None
    assert len(report["gated_trace"]["target_kl"]) == 2 and report["fit_trace"] is None
    shares = report["gate"]["open_share"]
    assert set(shares) == {"0", "1"} and report["gate"]["positions"]["fit tables"] > 0
    assert report["gate"]["positions"]["held-out tables"] > 0 and report["gate"]["positions"]["held-out cells"] > 0
    assert all(0 <= v <= 1 for layer in shares.values() for v in layer.values() if v is not None)
    text = (out / "report.md").read_text()
    assert "## Gated fit" in text and "## Gates" in text and "target JS distance (before each step)" in text
    assert "combined by their power mean with exponent 2 (--template-power): people 0." in text
    assert "each word left out with probability 0.2 (--prompt-dropout)" in text
    assert "the mean of the fitted parameters after each of the last 2 steps (--average-last)" in text
    folded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert folded.config.intermediate_size == base + 2 and folded.config.mlp_bias


def test_cli_reweighting_is_off_unless_asked_for():
    from prunescope.commands.edit import _config

    parser = cli.build_parser()
    base = ["edit", "--target", "Gender=uniform"]
    assert not _config(parser.parse_args(base)).reweight
    assert _config(parser.parse_args(base + ["--reweight"])).reweight


def test_cli_help_example_is_a_valid_command_of_the_recipe_the_readme_measures(capsys):
    """The example in ``edit --help`` parses into the configuration of the README's gated runs
    (so a renamed or removed option breaks this test, not a user's copy of the example)."""
    import shlex

    from prunescope.commands.edit import _config

    with pytest.raises(SystemExit):
        cli.main(["edit", "--help"])
    text = capsys.readouterr().out
    command = text[text.index("  prunescope edit "):].split("\n\n")[0].replace("\\\n", " ")
    config = _config(cli.build_parser().parse_args(shlex.split(command)[1:]))
    assert config.kinds == ("gated",) and config.holds == ("Age.digit2", "Age.digit3")
    assert (config.steps, config.fit_tables, config.fit_loss) == (120, 48, "js")
    assert (config.prompt_dropout, config.average_last, config.match_ppl) == (0.15, 30, (1.0, 2.0))
    assert config.targets == ("Age.digit1=uniform:2-6", "Gender=Male:0.5,Female:0.5")


def test_cli_fit_loss_is_kl_unless_asked_for_and_names_what_is_valid(capsys):
    from prunescope.commands.edit import _config
    from prunescope.errors import PrunescopeError

    parser = cli.build_parser()
    base = ["edit", "--target", "Gender=uniform"]
    assert _config(parser.parse_args(base)).fit_loss == "kl"
    assert _config(parser.parse_args(base + ["--fit-loss", "js"])).fit_loss == "js"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(base + ["--fit-loss", "l2"])
    assert exc.value.code == 2 and "invalid choice: 'l2' (choose from kl, js)" in capsys.readouterr().err.replace(
        "'kl', 'js'", "kl, js")
    with pytest.raises(PrunescopeError, match="fit-loss must be kl or js, got 'l2'"):
        job.EditConfig(targets=("Gender=uniform",), fit_loss="l2")


def test_cli_template_power_and_prompt_dropout_default_to_off_and_name_what_is_valid():
    from prunescope.commands.edit import _config
    from prunescope.errors import PrunescopeError

    parser = cli.build_parser()
    base = ["edit", "--target", "Gender=uniform"]
    assert _config(parser.parse_args(base)).template_power == 1.0
    assert _config(parser.parse_args(base + ["--template-power", "4"])).template_power == 4.0
    for bad in ("0.5", "nan", "inf", "-2"):
        with pytest.raises(PrunescopeError, match=f"template-power must be a finite number >= 1 .* got {bad}"):
            _config(parser.parse_args(base + ["--template-power", bad]))
    assert _config(parser.parse_args(base)).prompt_dropout == 0.0
    assert _config(parser.parse_args(base + ["--prompt-dropout", "0.15"])).prompt_dropout == 0.15
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(PrunescopeError, match=r"prompt-dropout must be a share in \[0, 1\) .* got"):
            _config(parser.parse_args(base + ["--prompt-dropout", bad]))
    with pytest.raises(PrunescopeError, match="--prompt-dropout and --reweight do not combine"):
        _config(parser.parse_args(base + ["--prompt-dropout", "0.1", "--reweight"]))
    assert _config(parser.parse_args(base)).prompt_dropout_unit == "token"
    assert _config(parser.parse_args(base + ["--prompt-dropout-unit", "word"])).prompt_dropout_unit == "word"
    with pytest.raises(PrunescopeError, match="prompt-dropout-unit must be token or word, got 'line'"):
        dataclasses.replace(_config(parser.parse_args(base)), prompt_dropout_unit="line")
    assert _config(parser.parse_args(base)).average_last == 1
    assert _config(parser.parse_args(base + ["--average-last", "30"])).average_last == 30
    for bad in ("0", "31"):
        with pytest.raises(PrunescopeError, match=rf"average-last must be an integer from 1 .* \(30\), got {bad}"):
            _config(parser.parse_args(base + ["--average-last", bad]))
    # the command lists its choices as literals (it imports no torch to parse): they must be the library's
    sub = parser._subparsers._group_actions[0].choices["edit"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["fit_loss"] == tuple(methods.TARGET_LOSSES)
    assert choices["prompt_dropout_unit"] == fields.THINNING_UNITS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "Height=uniform"], "Height"),
        (["--target", "Gender=Male:0.7,Female:0.7"], "sum"),
        (["--target", "Gender=Male:-1,Female:2"], ">= 0"),
        (["--target", "Gender=uniform", "--layers", "40"], "outside the model's"),
        (["--target", "Gender=uniform", "--strength", "nan"], "finite"),
        (["--target", "Gender=uniform", "--method", "rome"], "unknown edit kind"),
        ([], "at least one --target"),
        (["--target", "Gender@3=uniform"], "names row 3, but the edit is fitted on rows 1-1"),
        (["--target", "Gender=uniform", "--strength", ","], "names no strength"),
        (["--target", "Gender=uniform", "--method", "fit,fit"], "name a kind twice"),
        (["--target", "Gender=uniform", "--eval-tokens", "100"], "at least one window"),
        (["--target", "Gender=uniform", "--match-ppl", "0"], "match-ppl must be finite positive"),
        (["--target", "Gender=uniform", "--match-ppl", "1,inf"], "match-ppl must be finite positive"),
        (["--target", "Gender=uniform", "--match-ppl", "two"], "--match-ppl 'two': expected comma-separated numbers"),
        (["--target", "Gender=uniform", "--fit-rewordings", "7"], "has 6 shipped fit rewordings"),
        (["--target", "Gender=uniform", "--fit-rewordings", "-1"], "fit-rewordings must be an integer >= 0"),
        (["--target", "Gender=uniform", "--fit-rewordings", "2", "--fit-tables", "2"], "give --fit-tables 3 or more"),
        (["--target", "Gender=uniform", "--fit-tables", "6"], "over the 7 fit templates (people, people/fit-1"),
        (["--target", "Gender=uniform", "--units", "0"], "units must be an integer >= 1"),
        (["--target", "Gender=uniform", "--kl-windows", "65"], "kl-windows must be an integer from 1 to 64"),
        (["--target", "Gender=uniform", "--save", "--offload"], "--save with --offload: folding the edit writes"),
    ],
)
def test_cli_edit_bad_input(digit_model_dir, tmp_path, capsys, args, message):
    rc = cli.main(["edit", str(digit_model_dir), *args, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["vector", "units", "weight"])
def test_saved_folded_model_gives_the_hooked_logits(dtok, people, tmp_path, kind):
    """The folded, reloaded folder computes what the hooked (or weight-edited) model computed."""
    from prunescope.edit.hooks import Units

    model = digit_model(dtok, seed=5)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    if kind == "units":
        edit = Edit([LayerEdit(1, units=Units(*(0.3 * torch.randn(*shape, generator=gen)
                                                  for shape in ((2, hidden), (2, hidden), (hidden, 2)))))])
    elif kind == "vector":
        edit = Edit([LayerEdit(0, add=torch.randn(hidden, generator=gen)),
                     LayerEdit(1, add=torch.randn(hidden, generator=gen), direction=torch.randn(hidden, generator=gen))])
    else:
        contexts = fields.record_contexts(model, dtok, people, _targets(people, "Gender=uniform"), 1, 3, 0, 3)
        edit = methods.weight_edit(model, contexts, {1: torch.randn(hidden, generator=gen)}, torch.randint(0, 300, (2, 16)))
    diff = job.save_edited(model, dtok, edit, tmp_path / "model")
    assert diff < 1e-4
    assert (tmp_path / "model" / "edit.safetensors").exists() == (kind != "weight")


def test_lr_factor_is_a_cosine_from_one_to_the_final_share():
    factors = [methods.lr_factor(s, 11, 0.1) for s in range(11)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.55)  # half way: the mean of the two ends
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert methods.lr_factor(3, 11, 1.0) == 1.0 and methods.lr_factor(0, 1, 0.1) == 1.0


def test_the_fits_last_step_takes_the_final_step_size(dtok, people):
    """With ``lr_final=0`` the second of two steps moves nothing: the vectors are the one-step
    fit's; with the constant step (the default) they move on."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted, unrelated = [torch.tensor(targets[0].probs)], torch.randint(0, 300, (2, 16))

    def vectors(steps: int, lr_final: float = 1.0) -> list[torch.Tensor]:
        edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2, max_norm=2.0,
                              lr_final=lr_final)
        return [e.add for e in edit.layers]

    one = vectors(1)
    for a, b in zip(one, vectors(2, lr_final=0.0)):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(one, vectors(2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_fit_on_cuda_matches_cpu(dtok, people):
    """The teacher-forced marginals and a fitted vector on CUDA equal the CPU's (float rounding)."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted = [torch.tensor(t.probs) for t in targets]
    unrelated = torch.randint(0, 300, (2, 16))
    cpu = [q.detach() for q in fields.marginals(model, contexts)]
    cpu_edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=3, lr=0.1)
    model.cuda()
    gpu = [q.detach().cpu() for q in fields.marginals(model, contexts)]
    gpu_edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=3, lr=0.1)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    for a, b in zip(cpu_edit.layers, gpu_edit.layers):
        torch.testing.assert_close(a.add, b.add.cpu(), atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_units_fit_with_kl_windows_in_turn_on_cuda_matches_cpu(dtok, people):
    """A units fit (drawn on the CPU's generator, then moved) whose KL term takes its windows in
    turn gives on CUDA the units and vectors it gives on the CPU (float rounding)."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted, unrelated = [torch.tensor(targets[0].probs)], torch.randint(0, 300, (3, 16))

    def fitted():
        edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=3, lr=0.1, units=2, kl_batch=1)
        return [t.cpu() for e in edit.layers for t in (e.add, e.units.gate, e.units.down)]

    cpu = fitted()
    model.cuda()
    for a, b in zip(cpu, fitted()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_gated_fit_on_cuda_matches_cpu(dtok, people):
    """The gates (a classifier trained on the device's MLP inputs) and the gated vectors fitted on
    CUDA are the CPU's (float rounding)."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 4, 0, 4)
    wanted = [torch.tensor(targets[0].probs)]
    unrelated = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))

    def fitted():
        gates = methods.gate_probe(model, contexts, unrelated, [0, 1])
        edit, _ = methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=3, lr=0.1, gates=gates)
        return [t.cpu() for e in edit.layers for t in (e.add, e.gate.weight)]

    cpu = fitted()
    model.cuda()
    for a, b in zip(cpu, fitted()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)


def test_fit_refreshes_its_contexts_from_the_edited_model(dtok, people):
    """Every refresh_every steps the fit asks for contexts written with the edit so far applied."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 3, 0, 3)
    calls = []

    def recontext(edit, refresh):
        calls.append((refresh, [float(e.add.norm()) for e in edit.layers], edit.layers[0].add.requires_grad))
        with applied(model, edit):
            return fields.record_contexts(model, dtok, people, targets, 1, 3, refresh, 3)

    methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1], torch.randint(0, 300, (2, 16)),
                steps=5, lr=0.2, recontext=recontext, refresh_every=2, reweight=False)
    assert [c[0] for c in calls] == [1, 2] and not any(c[2] for c in calls)
    assert all(n > 0 for c in calls for n in c[1])  # the edit so far, not the zero start


def test_reweighted_fit_refreshes_once_its_weights_degenerate(dtok, people, monkeypatch):
    """With importance weights the fit also re-records as soon as the effective tables fall below
    the threshold (raised here: the tiny model's contexts barely depend on the edit); the first
    step's weights are all equal (the contexts' own edit)."""
    monkeypatch.setattr(methods, "REFRESH_EFFECTIVE", 0.9)
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1@2=3:1")
    contexts = fields.record_contexts(model, dtok, people, targets, 2, 6, 0, 6)
    steps = []

    def recontext(edit, refresh):
        steps.append(refresh)
        with applied(model, edit):
            return fields.record_contexts(model, dtok, people, targets, 2, 6, refresh, 6)

    _edit, trace = methods.fit(model, contexts, [torch.tensor(targets[0].probs)], [0, 1],
                               torch.randint(0, 300, (2, 16)), steps=4, lr=1.0, kl_weight=0.0,
                               recontext=recontext, refresh_every=100, reweight=True)
    assert trace.reweighted and trace.effective_tables[0] == pytest.approx(6)
    low = [i for i, e in enumerate(trace.effective_tables[:-1]) if e < methods.REFRESH_EFFECTIVE * 6]
    assert low and len(steps) == len(low)  # one refresh after each step whose weights degenerated
    assert list(trace.refreshed_before) == [i + 2 for i in low]  # 1-based: before the next step


@pytest.mark.parametrize(
    "change, goal, start, expect",
    [
        (lambda s: 10 * s * s, 2.0, 0.05, (2 / 10) ** 0.5),  # doubled up from a small start, then bisected
        (lambda s: 40 * s, 2.0, 1.0, 0.05),  # bisected down from a start far past the goal
        (lambda s: -0.5 + 4 * s, 2.0, 0.5, 0.625),  # a change below zero at small strengths
    ],
)
def test_matched_strength_finds_the_goal(change, goal, start, expect):
    from prunescope.edit.job import matched_strength

    strength, tried = matched_strength(change, goal, start)
    assert abs(change(strength) - goal) <= goal / 10
    assert strength == pytest.approx(expect, rel=0.1)
    assert (strength, change(strength)) in tried and len(tried) <= 15


def test_matched_strength_that_never_reaches_the_goal_is_the_largest_tried(caplog):
    from prunescope.edit.job import matched_strength

    strength, tried = matched_strength(lambda s: 0.0 * s, 2.0, 1.0, doublings=3)
    assert strength == 8.0 and [s for s, _ in tried] == [1.0, 2.0, 4.0, 8.0]
    assert "still changes perplexity by less than" in caplog.text


def test_match_ppl_measures_each_kind_at_the_matched_change(digit_model_dir, tmp_path):
    """--match-ppl alone: one row per kind and goal, at a strength whose perplexity change is the
    goal (within a tenth), or, for a kind that cannot reach it, one row at the largest strength
    tried, reported as not matched (None) rather than as a match it is not."""
    text = _unrelated_text(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["-q", "edit", str(digit_model_dir), "--target", "Gender=uniform", "--method", "fit,caa",
                   "--layers", "0-1", "--steps", "2", "--fit-tables", "4", "--fit-rewordings", "3", "--measure-tables", "3",
                   "--match-ppl", "1,3", "--eval-text", str(text), "--eval-tokens", "512", "--eval-seqlen", "16",
                   "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "report.json").read_text())["results"]
    # two fitted steps on this tiny model stay under +1% even at 64 x: measured once, not matched
    assert [(r["kind"], r["matched_ppl_change"]) for r in results] == [("fit", None), ("caa", 1), ("caa", 3)]
    for r in results:
        change, goal = 100 * (r["ppl_after"] / r["ppl_before"] - 1), r["matched_ppl_change"]
        if goal is None:
            assert r["strength"] == 64 * min(job.DEFAULT_STRENGTHS[r["kind"]]) and change < 1
        else:
            assert abs(change - goal) <= goal / 10
    assert "matched +1% ppl" in (out / "report.md").read_text()
    # by default the fit reads every rewording the template ships for fitting
    assert len(json.loads((out / "report.json").read_text())["fit_templates"]) == 4


def test_other_fields_leave_out_fields_rarely_reached():
    from prunescope.edit.job import _others_js

    def rec(dist, marginal):
        return {"distribution": dist, "exact_marginal": marginal}

    before = {"row 1 / Age digit 3": rec([1.0, 0.0], [0.01, 0.0]), "row 1 / Gender": rec([0.9, 0.1], [0.9, 0.1])}
    after = {"row 1 / Age digit 3": rec([0.0, 1.0], [0.0, 0.01]), "row 1 / Gender": rec([0.5, 0.5], [0.5, 0.5])}
    only_gender = _others_js({"row 1 / Gender": before["row 1 / Gender"]}, after, [])
    assert _others_js(before, after, []) == pytest.approx(only_gender)  # the digit reached 1% of the time: left out
    assert only_gender > 0.2


def test_fit_templates_are_the_template_then_its_fit_rewordings(people, tmp_path, capsys):
    """The shipped fit rewordings come after the template, worded apart from it and from every
    held-out rewording; asking for more than are shipped, or fitting on a held-out prompt, is a
    clear error."""
    from prunescope.edit.rewordings import fit_templates, heldout_templates
    from prunescope.errors import PrunescopeError

    heldout = heldout_templates(people)
    got = fit_templates(people, heldout=heldout)  # all of them by default
    assert [t.name for t in got] == ["people", *(f"people/fit-{i}" for i in range(1, 7))]
    assert fit_templates(people, 3, heldout=heldout) == got[:4]
    prompts = {t.prompt for t in got} | {t.prompt for t in heldout}
    assert len(prompts) == len(got) + len(heldout) and all(t.columns == people.columns for t in got)
    assert all("{rows}" in t.prompt and t.prompt.endswith("{table}") for t in got)
    with pytest.raises(PrunescopeError, match="has 6 shipped fit rewordings; give at most 6"):
        fit_templates(people, 7)
    with pytest.raises(SystemExit):
        cli.main(["edit", "--help"])
    assert f"(people: {len(got) - 1}; never" in " ".join(capsys.readouterr().out.split())  # --help says how many
    copy = tmp_path / "copy.yaml"
    copy.write_text(json.dumps({"name": "x", "prompt": heldout[0].prompt,
                                "columns": [{"name": "Name", "type": "text", "max_tokens": 8},
                                            {"name": "Gender", "type": "choice",
                                             "choices": ["Male", "Female", "Non-binary"]},
                                            {"name": "Age", "type": "digits", "min_length": 1, "max_length": 3}]}))
    with pytest.raises(PrunescopeError, match="both fitted on and held out"):
        fit_templates(people, 0, [copy], heldout)
    own = tmp_path / "own.yaml"
    own.write_text(copy.read_text().replace(json.dumps(heldout[0].prompt)[1:-1], "List {rows} people.\\n{table}"))
    assert [t.name for t in fit_templates(people, 1, [own], heldout)] == ["people", "people/fit-1", str(own)]
    with pytest.raises(PrunescopeError, match="fit template file .*missing.yaml does not exist"):
        fit_templates(people, 0, [tmp_path / "missing.yaml"])


def test_fit_on_several_templates_averages_their_target_terms(dtok, people):
    """With two templates' contexts the fit's target term is the mean of each template's own
    (first step: no edit yet), and one template's contexts given twice fit what it fits alone."""
    from prunescope.edit.rewordings import fit_templates

    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    a, b = [fields.record_contexts(model, dtok, t, targets, 1, 3, 0, 3) for t in fit_templates(people, 1)]
    assert a.prompt != b.prompt
    unrelated = torch.randint(0, 300, (2, 16))

    def fitted(contexts, steps=1):
        return methods.fit(model, contexts, wanted, [0, 1], unrelated, steps=steps, lr=0.2)

    first = {name: fitted(c)[1].target_kl[0] for name, c in (("a", a), ("b", b), ("ab", [a, b]))}
    assert first["a"] != pytest.approx(first["b"])
    assert first["ab"] == pytest.approx((first["a"] + first["b"]) / 2, rel=1e-5)
    alone, twice = fitted(a, 3), fitted([a, a], 3)
    assert alone[1].target_kl == pytest.approx(twice[1].target_kl, rel=1e-5)
    for x, y in zip(alone[0].layers, twice[0].layers):
        torch.testing.assert_close(x.add, y.add)


def test_contrast_and_keys_average_over_templates(dtok, people):
    """caa's contrast and the weight edits' keys over two templates are the means of each one's."""
    from prunescope.edit.rewordings import fit_templates

    model = digit_model(dtok, seed=4)
    targets = _targets(people, "Age.digit1=uniform:2-6", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    a, b = [fields.record_contexts(model, dtok, t, targets, 1, 3, 0, 3) for t in fit_templates(people, 1)]
    one, other, both = (methods.contrast(model, c, wanted, [1])[1] for c in (a, b, [a, b]))
    torch.testing.assert_close(both, (one + other) / 2)
    one, other, both = (methods._field_keys(model, c, [1])[1] for c in (a, b, [a, b]))
    assert both.shape == (model.config.intermediate_size, 2)
    torch.testing.assert_close(both, (one + other) / 2)


def test_fit_contexts_spread_the_tables_and_keep_the_templates_seeds(dtok, people):
    """--fit-tables are spread evenly over the fit templates, and the training template's
    contexts are those a fit on it alone records (the same seed)."""
    config = job.EditConfig(targets=("Gender=uniform",), fit_tables=5, fit_rewordings=2)
    template, targets, heldout, fitted_on = job.check_inputs(config)
    setting = job._Setting(template, heldout, fitted_on, targets, torch.empty(0), torch.empty(0), torch.empty(0))
    model = digit_model(dtok, seed=2)
    got = job.record_fit_contexts(model, dtok, config, setting, 0)
    assert [len(c.fields[0].suffixes) for c in got] == [2, 2, 1]
    alone = fields.record_contexts(model, dtok, people, targets, 1, 2, config.seed, prompt_rows=config.measure_rows)
    assert got[0].prompt == alone.prompt
    assert got[0].fields[0].suffixes == alone.fields[0].suffixes and got[0].fields[0].sampled == alone.fields[0].sampled
    assert len({c.prompt for c in got}) == 3
    seeds = [job.fit_seed(0, r, j) for r in range(25) for j in range(4)]
    assert len(set(seeds)) == len(seeds) and job.MEASURE_SEED not in seeds  # never the measured tables
    assert seeds[:2] == [0, 1] and job.fit_seed(0, 1, 0) == 100  # the seeds of the runs before rewordings


def test_a_fit_template_no_table_reached_is_named(dtok, people, monkeypatch, caplog):
    """At the first recording such a template ends the run, named; on a refresh it keeps its previous contexts."""
    from prunescope.errors import PrunescopeError

    config = job.EditConfig(targets=("Age.digit3=uniform",), fit_tables=4, fit_rewordings=1)
    template, targets, heldout, fitted_on = job.check_inputs(config)
    setting = job._Setting(template, heldout, fitted_on, targets, torch.empty(0), torch.empty(0), torch.empty(0))

    def record(model, tokenizer, t, *args, **kwargs):
        if t.name == "people/fit-1":
            raise PrunescopeError("none of the 2 tables written for fitting reached Age digit 3 at row 1")
        return "contexts"

    monkeypatch.setattr(fields, "record_contexts", record)
    with pytest.raises(PrunescopeError, match="^fit template people/fit-1: none of the 2 tables"):
        job.record_fit_contexts(None, dtok, config, setting, 0)
    # on a refresh the template whose new tables reach the field nowhere keeps its previous contexts
    with caplog.at_level("WARNING", logger="prunescope.edit.job"):
        got = job.record_fit_contexts(None, dtok, config, setting, 1, previous=["old fit", "old fit-1"])
    assert got == ["contexts", "old fit-1"]
    assert "refresh 1, fit template people/fit-1: none of the 2 tables" in caplog.text


def test_fit_on_several_templates_refreshes_them_all_and_checks_their_fields(dtok, people):
    """A refresh re-records every template; a recontext that returns other fields is refused."""
    from prunescope.edit.rewordings import fit_templates

    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=3:1", "Gender=uniform")
    wanted = [torch.tensor(t.probs) for t in targets]
    templates = fit_templates(people, 1)

    def record(seed, which=targets):
        return [fields.record_contexts(model, dtok, t, which, 1, 2, seed + j, 2) for j, t in enumerate(templates)]

    calls = []

    def recontext(edit, refresh):
        calls.append(refresh)
        with applied(model, edit):
            return record(100 * refresh)

    edit, trace = methods.fit(model, record(0), wanted, [0, 1], torch.randint(0, 300, (2, 16)), steps=4, lr=0.2,
                              recontext=recontext, refresh_every=2)
    assert calls == [1] and trace.refreshed_before == (3,) and len(trace.target_kl) == 4
    assert all(torch.isfinite(e.add).all() for e in edit.layers)
    with pytest.raises(ValueError, match="other templates or fields"):
        methods.fit(model, record(0), wanted, [0], torch.randint(0, 300, (2, 16)), steps=2,
                    recontext=lambda e, r: record(7, targets[::-1]), refresh_every=1)
    with pytest.raises(ValueError, match="record different fields"):
        methods.fit(model, [record(0)[0], record(0, targets[::-1])[1]], wanted, [0], torch.randint(0, 300, (2, 16)))


def test_units_on_a_family_without_separate_gate_and_up_fail_before_measuring(dtok):
    """Phi-3 fuses gate and up: the units kind is refused at once, not after the other kinds ran."""
    from prunescope.errors import PrunescopeError
    from prunescope.testing import tiny_family_model

    config = job.EditConfig(targets=("Gender=uniform",), kinds=("fit", "units"), layers=(0,))
    with pytest.raises(PrunescopeError, match="separate gate and up projections"):
        job.run_edit_on(tiny_family_model("phi3"), dtok, config)


def test_kl_windows_are_taken_in_turn_with_the_unedited_models_distributions(dtok):
    """The fit's side-effect term runs on ``kl_batch`` windows per step, the next ones each step
    (wrapping around), against the unedited model's next-token log-probabilities on them."""
    model = digit_model(dtok, seed=3)
    windows = torch.randint(0, 300, (5, 12))
    turns = methods._KLWindows(model, windows, 2)
    for step, rows in [(0, [0, 1]), (1, [2, 3]), (2, [4, 0]), (3, [1, 2])]:
        batch, reference = turns.at(step)
        assert torch.equal(batch, windows[rows])
        with torch.no_grad():
            torch.testing.assert_close(reference, torch.log_softmax(model(input_ids=windows[rows]).logits, -1))
    assert torch.equal(turns.first, windows[:2])
    every = methods._KLWindows(model, windows, 5)
    assert every.at(0)[1] is every.at(7)[1]  # one batch: computed once


def test_a_fit_on_all_its_kl_windows_at_once_is_the_default_fit(dtok, people):
    """``kl_batch`` equal to the number of windows is the fit without it (the same vectors), and
    a kl_batch outside 1..n is refused."""
    model = digit_model(dtok, seed=2)
    targets = _targets(people, "Age.digit1=uniform:2-6")
    contexts = fields.record_contexts(model, dtok, people, targets, 1, 3, 0, 3)
    wanted = [torch.tensor(targets[0].probs)]
    unrelated = torch.randint(0, 300, (3, 16))
    a, _ = methods.fit(model, contexts, wanted, [0], unrelated, steps=3, lr=0.2)
    b, _ = methods.fit(model, contexts, wanted, [0], unrelated, steps=3, lr=0.2, kl_batch=3)
    c, _ = methods.fit(model, contexts, wanted, [0], unrelated, steps=3, lr=0.2, kl_batch=1)
    assert torch.equal(a.layers[0].add, b.layers[0].add) and not torch.equal(a.layers[0].add, c.layers[0].add)
    with pytest.raises(ValueError, match="kl_batch 4 must lie in 1..3"):
        methods.fit(model, contexts, wanted, [0], unrelated, steps=1, kl_batch=4)


def _fake_perplexity(monkeypatch, change_per_strength: float) -> None:
    """Make job._strengths see perplexity 10 x (1 + change_per_strength x strength / 100): an edit
    here is its strength alone."""
    import contextlib

    current: dict[str, float] = {}

    def applied(_model, edit):
        current["s"] = edit
        return contextlib.nullcontext()

    monkeypatch.setattr(job, "_applied", applied)
    monkeypatch.setattr(job.evaluate, "perplexity", lambda *_a, **_k: 10.0 * (1 + change_per_strength * current["s"] / 100))


def test_matched_strengths_are_measured_once_and_a_goal_given_strength_is_labelled(monkeypatch):
    """A goal whose strength is also given (--strength 1 --match-ppl 1) labels that one row; a
    second goal landing on it (within a tenth) adds no row."""
    from types import SimpleNamespace

    _fake_perplexity(monkeypatch, 1.0)  # change (%) = strength
    config = job.EditConfig(targets=("Gender=uniform",), strengths=(1.0,), match_ppl=(1.0, 1.05))
    out = job._strengths("fit", lambda s: s, None, config, SimpleNamespace(eval_blocks=None), 10.0)
    assert [(s, goal) for s, goal, _t in out] == [(1.0, 1.0)]


def test_gated_match_stops_at_the_fitted_strength_and_says_not_matched(monkeypatch):
    """gated: perplexity barely moves, so both goals end at x1, measured once, not matched; a
    kind reaching its goal at the largest strength within a tenth is matched."""
    from types import SimpleNamespace

    _fake_perplexity(monkeypatch, 0.01)
    config = job.EditConfig(targets=("Gender=uniform",), kinds=("gated",), match_ppl=(1.0, 2.0))
    out = job._strengths("gated", lambda s: s, None, config, SimpleNamespace(eval_blocks=None), 10.0)
    assert [(s, goal) for s, goal, _t in out] == [(1.0, None)]
    _fake_perplexity(monkeypatch, 0.95)  # x1 changes perplexity by 0.95%: within a tenth of 1%
    out = job._strengths("gated", lambda s: s, None, config, SimpleNamespace(eval_blocks=None), 10.0)
    assert [(s, goal) for s, goal, _t in out][0] == (1.0, 1.0)


@pytest.mark.parametrize(("family", "kind", "refused"), [
    ("mistral", "gated", True), ("qwen3", "fit", True), ("mistral", "ablate", False), ("llama", "gated", False),
])
def test_save_of_an_added_vector_is_refused_early_where_no_mlp_bias_can_hold_it(family, kind, refused):
    from prunescope.errors import PrunescopeError
    from prunescope.testing import tiny_family_model

    model = tiny_family_model(family)
    if refused:
        with pytest.raises(PrunescopeError, match=rf"--save folds the first kind \({kind}\), an added vector"):
            job.check_save(model, kind)
    else:
        job.check_save(model, kind)


def test_a_held_field_moves_less_than_without_the_hold(dtok, people):
    """--hold: the fit's term for a held field has the unedited model's marginal as its target
    (hold_targets: the mean over templates of fields.marginals); fitted towards a gender with the
    first age digit held, the digit moves less than in the same fit without the hold."""
    model = digit_model(dtok, seed=2)
    gender = _targets(people, "Gender=Female:1")
    held = _targets(people, "Age.digit1=uniform")
    contexts = [fields.record_contexts(model, dtok, people, gender + held, 1, 6, seed, 6) for seed in (0, 1)]
    own = job.hold_targets(model, contexts, 1)
    with torch.no_grad():
        want = torch.stack([fields.marginals(model, c)[1] for c in contexts]).mean(0)
    torch.testing.assert_close(own, want)
    unrelated = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))

    def digit_shift(with_hold: bool) -> float:
        targets = [torch.tensor(gender[0].probs)] + ([own] if with_hold else [])
        ctx = contexts if with_hold else [fields.Contexts(c.prompt, c.fields[:1]) for c in contexts]
        edit, _ = methods.fit(model, ctx, targets, [0, 1], unrelated, steps=6, lr=0.2, kl_weight=0.0, max_norm=2.0)
        with torch.no_grad(), applied(model, edit):
            after = torch.stack([fields.marginals(model, c)[1] for c in contexts]).mean(0)
        return float((after - own).abs().sum())

    assert digit_shift(True) < digit_shift(False)


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "Gender=uniform", "--hold", "Gender"], "--hold Gender: that field is a --target"),
    (["--target", "Gender=uniform", "--hold", "Height"], "Height"),
    (["--target", "Gender=uniform", "--hold", "Age.digit2", "--method", "fit,caa"], "drop it or the kinds caa"),
    (["--target", "Gender=uniform", "--gate-negative", "people", "--method", "gated"], "has the columns of template people"),
    (["--target", "Gender=uniform", "--gate-negative", "/nowhere/t.yaml", "--method", "gated"],
     "--gate-negative /nowhere/t.yaml: template '/nowhere/t.yaml' is neither"),
    (["--target", "Gender=uniform", "--gate-negative", "people"], "add gated to --method"),
])
def test_cli_hold_bad_input(args, message, capsys):
    rc = cli.main(["-q", "edit", *args, "--out", "/tmp/never-written"])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_gate_negative_without_a_choice_or_digits_column(tmp_path, capsys):
    path = tmp_path / "notes.yaml"
    path.write_text("name: notes\nprompt: |-\n  {rows} notes\n  {table}\ncolumns:\n  - {name: Note, type: text}\n")
    rc = cli.main(["-q", "edit", "--target", "Gender=uniform", "--method", "gated", "--gate-negative", str(path),
                   "--out", str(tmp_path / "out")])
    assert rc == 2 and "has no choice or digits column" in capsys.readouterr().err


def test_a_negative_table_sharing_a_fitted_column_is_warned_about(tmp_path, caplog):
    staff = tmp_path / "staff.yaml"
    staff.write_text("name: staff\nprompt: |-\n  {rows} staff\n  {table}\ncolumns:\n"
                     "  - {name: Gender, type: choice, choices: [Male, Female]}\n"
                     "  - {name: Salary, type: digits, min_length: 2, max_length: 3}\n")
    config = job.EditConfig(targets=("Age.digit1=uniform:2-6",), kinds=("gated",), holds=("Gender",),
                            gate_negatives=(str(staff), str(_products(tmp_path))))
    template, targets, heldout, fitted_on = job.check_inputs(config)
    setting = job._Setting(template, heldout, fitted_on, targets, torch.empty(0), torch.empty(0), torch.empty(0),
                           holds=job.parse_holds(config, template, targets),
                           negatives=job.parse_negatives(config, template))
    with caplog.at_level("WARNING", logger="prunescope.edit.job"):
        assert job.warn_shared_columns(setting) == ["Gender"]  # the held field's column; products shares none
    assert f"--gate-negative {staff} has the column Gender" in caplog.text


def test_cli_gate_negative_given_twice(tmp_path, capsys):
    path = _products(tmp_path)
    rc = cli.main(["-q", "edit", "--target", "Gender=uniform", "--method", "gated", "--gate-negative", str(path),
                   "--gate-negative", f"{tmp_path}/./products.yaml", "--out", str(tmp_path / "out")])
    assert rc == 2 and "names the template of --gate-negative" in capsys.readouterr().err


def test_cli_gated_fit_with_a_hold_and_a_negative_table(digit_model_dir, tmp_path):
    """A held field is left out of the target JS; a --gate-negative table's positions are
    recorded, trained against and reported (the gates' share there), and named in the options."""
    out = tmp_path / "out"
    rc = cli.main(["-q", "edit", str(digit_model_dir), "--target", "Gender=uniform", "--hold", "Age.digit1",
                   "--gate-negative", str(_products(tmp_path)), "--method", "gated", "--layers", "0-1", "--steps", "2", "--fit-tables", "2", "--fit-rewordings",
                   "1", "--measure-tables", "2", "--strength", "1", "--eval-text", str(_unrelated_text(tmp_path)),
                   "--eval-tokens", "512", "--eval-seqlen", "16", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["holds"] == ["Age.digit1"] and report["target_fields"] == ["Gender"]
    assert report["results"][0]["target_js_after"] is not None
    negative = f"negative: {tmp_path / 'products.yaml'}"
    assert report["options"]["gate_negatives"] == [str(tmp_path / "products.yaml")]
    assert report["gate"]["positions"][negative] > 0
    assert set(report["cell_norms"]["ratio"]) == {f"{t} / row 1 / Gender" for t in ("people", "people/fit-1",
                                                                                     *report["heldout_templates"])}
    assert all(layer[negative] < 0.5 for layer in report["gate"]["open_share"].values())  # trained to stay shut


def test_cell_norms_are_the_direct_forward_passes_norms(dtok, people):
    """Per field and layer, the median over tables of the residual norm entering the layer at the
    cell over the median over its table's positions == what ``output_hidden_states`` of a plain
    forward pass over the prompt and each suffix gives (hidden_states[i] enters layer i), with
    suffixes of different lengths (the batch's pads left out)."""
    model = digit_model(dtok, seed=1)
    contexts = fields.record_contexts(model, dtok, people, _targets(people, "Gender=uniform", "Age.digit1=uniform:2-6"),
                                      rows=1, tables=4, seed=3)
    first = contexts.fields[0]
    cut = dataclasses.replace(first, suffixes=(first.suffixes[0][:-3], first.suffixes[1][:-1], *first.suffixes[2:]))
    contexts = dataclasses.replace(contexts, fields=(cut, *contexts.fields[1:]))
    got = methods.cell_norms(model, contexts)
    assert list(got) == ["row 1 / Gender", "row 1 / Age digit 1"]
    assert len({len(s) for s in cut.suffixes}) == 3
    start = len(contexts.prompt)
    for f in contexts.fields:
        ratios = []
        for suffix in f.suffixes:
            with torch.no_grad():
                ids = torch.tensor([[*contexts.prompt, *suffix]])
                states = model(input_ids=ids, output_hidden_states=True).hidden_states  # per layer [1, S, hidden]
            ratios.append([float(states[i][0, -1].norm() / states[i][0, start:].norm(dim=-1).quantile(0.5))
                           for i in range(len(model.model.layers))])
        want = torch.tensor(ratios).quantile(0.5, dim=0)
        torch.testing.assert_close(torch.tensor(got[f"row 1 / {f.key.label}"]), want, atol=1e-4, rtol=1e-4)


def test_a_massive_activation_at_an_edited_layer_is_warned_about(dtok, people, monkeypatch, caplog):
    """A cell at 3x its table's median or more at an edited layer is named with those layers and
    the layers where every cell is ordinary; a cell under the threshold, or over it only at
    layers not edited, is not."""
    held = Template("people/held", people.prompt, people.columns)
    setting = job._Setting(people, [held], [people], [], *(torch.zeros(1, 1, dtype=torch.long),) * 3)
    ratios = iter([{"row 1 / Age digit 1": [1.0, 1.2, 0.9, 1.0, 3.5]},
                   {"row 1 / Age digit 1": [1.0, 5.4, 4.0, 1.0, 0.9], "row 1 / Gender": [1.0] * 5}])
    monkeypatch.setattr(methods, "cell_norms", lambda model, contexts: next(ratios))
    setting.heldout_contexts = [(held, fields.Contexts((), ()))]
    with caplog.at_level("WARNING"):
        report = job.cell_norm_report(None, setting, [fields.Contexts((), ())], [2, 3])
    assert list(report["ratio"]) == ["people / row 1 / Age digit 1", "people/held / row 1 / Age digit 1",
                                     "people/held / row 1 / Gender"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("people/held / row 1 / Age digit 1: the residual stream entering layer 2 is 4.0x")
    assert "every targeted cell is under 3x: 0, 3" in warning


def test_a_heldout_template_no_table_reaches_is_left_out_of_the_readings(dtok, people, monkeypatch, caplog):
    """Where a held-out template's tables reach a targeted field nowhere, the gates and the cells'
    norms are read on the others, with a warning naming it, instead of ending the run."""
    model = digit_model(dtok, seed=1)
    held = [Template(f"people/held-{i}", people.prompt, people.columns) for i in (1, 2)]
    setting = job._Setting(people, held, [people], _targets(people, "Gender=uniform"),
                           *(torch.zeros(1, 1, dtype=torch.long),) * 3)
    record = fields.record_contexts

    def failing(model, tokenizer, template, *args, **kwargs):
        if template.name == "people/held-1":
            raise job.PrunescopeError("no table reached row 1 / Gender")
        return record(model, tokenizer, template, *args, **kwargs)

    monkeypatch.setattr(fields, "record_contexts", failing)
    with caplog.at_level("WARNING"):
        got = job.heldout_contexts(model, dtok, job.EditConfig(targets=("Gender=uniform",)), setting)
    assert [t.name for t, _ in got] == ["people/held-2"]
    assert any("held-out template people/held-1: no table reached" in r.getMessage() for r in caplog.records)
