"""The four kinds of edit, each built from the same recorded contexts (:mod:`.fields`).

* ``fit``: one vector per chosen layer, added to the MLP writer's output (the residual stream
  after that layer) at every position, optimized with the model frozen (Adam) to minimize
  ``sum_fields KL(target || exact marginal) + kl_weight * KL(original || edited)`` of the
  next-token distributions on unrelated text, each vector's norm kept under a bound; each
  field's distribution has one more outcome, "none of the values" (the cell written some other
  way), held at the unedited model's share (:func:`_with_elsewhere`); with several templates
  (rewordings of one table) the mean of each one's KL (with ``loss="js"`` the JS distance the
  report measures in place of each field's KL, :func:`js_to`; with ``template_power`` above 1
  a power mean that weighs the farthest templates more, :func:`power_mean`; with
  ``prompt_dropout`` each step reads them after instructions thinned out anew, token by token
  or word by word, :func:`~prunescope.edit.fields.with_thinned_instruction`; with
  ``average_last`` the edit kept is the mean of the last steps' parameters). The marginals are
  read on contexts recorded from tables the edited model wrote, re-recorded every few steps;
  with ``reweight`` also importance-weighted by how much likelier the edit so far makes them
  (re-recorded as soon as the weights degenerate).
* ``units``: the same fit with ``k`` new units per chosen layer's gated MLP beside each vector
  (:class:`~prunescope.edit.hooks.Units`, gate and up rows drawn like the layer's own, down
  starting at zero): what they add depends on the hidden state, so they can write on the
  table's cells, or cancel the vector on unrelated text, which a vector added everywhere
  cannot. Measured on the bundled model, units alone (no vector; commit 9505b18) came out
  farther from the targets than the vectors at the same perplexity.
* ``gated``: the same fit with each vector switched by a gate read from the hidden state
  (:class:`~prunescope.edit.hooks.Gate`): a linear classifier of the MLP's input, trained
  before the fit to tell the tables' positions from unrelated text (:func:`gate_probe`), opens
  the vector where the model writes a table and shuts it elsewhere; the vectors are then
  fitted with the gate fixed. Folded as two new units per layer (a wider MLP with biases).
* ``caa``: contrastive activation addition: per chosen layer, the mean residual after the value
  tokens weighted by the target minus the same weighted by the model's own distribution, i.e.
  "activations that lead to the wanted values minus those that lead to the preferred ones",
  added with a norm that is a fraction (the strength) of the layer's median residual norm.
* ``ablate``: the unit direction of that contrast projected out of both writers' outputs at the
  chosen layers (a direction pruned instead of a weight).
* ``weight``: a rank-one edit of each chosen layer's MLP ``down_proj`` that writes the fitted
  vector for the mean key the layer sees at each targeted field's cells (ROME's closed form with
  the second moment of unrelated keys), or with ``null=True`` only through the directions those
  sampled unrelated keys barely use (AlphaEdit's null-space projection).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import models
from prunescope.edit import fields, hooks
from prunescope.edit.hooks import Edit, Gate, LayerEdit, applied

log = logging.getLogger(__name__)

REFRESH_EFFECTIVE = 0.5  # re-record the fit's contexts once the weights' effective tables fall below this share


def kl_to(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(target || q)`` in nats over the values where the target has mass (``q`` sums to 1).
    ``q`` is clamped at 1e-12 inside the log, where its gradient is then zero: a target value
    the model never writes is only reached through the others' mass."""
    t = target.to(q)
    keep = t > 0
    return (t[keep] * (t[keep].log() - q[keep].clamp_min(1e-12).log())).sum()


JS_FLOOR = 1e-10  # added to the divergence under the square root: its gradient stays finite at a perfect fit


def js_to(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon distance between ``target`` and ``q`` (each ``[values]`` summing to 1):
    the square root of the base-2 JS divergence, as the report measures it
    (:func:`prunescope.probe.stats.js_distance`). ``KL(target || q)`` sees a small mass ``m`` on
    values the target excludes as about ``m`` nats; the distance, when that mass is all there is
    of it, reads ``sqrt(m / 2)``. Its gradient is the divergence's over twice the distance: a
    field already close is pushed as hard as one that is far, while within a field the divergence
    weighs a stray mass against the shape much as the KL does (1-2x more, tests/test_edit.py)."""
    t = target.to(q)
    m = (t + q) / 2  # [values], > 0 wherever either has mass
    divergence = (kl_to(t, m) + kl_to(q, m)) / (2 * math.log(2))  # bits
    return (divergence.clamp_min(0) + JS_FLOOR).sqrt()


TARGET_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"kl": kl_to, "js": js_to}


def power_mean(terms: torch.Tensor, power: float) -> torch.Tensor:
    """``(mean_t terms_t ** power) ** (1 / power)`` of non-negative ``[templates]`` terms: the
    mean at 1; above 1 a mean that weighs the larger terms more, towards their maximum as the
    power grows (each term's gradient is ``(terms_t / result) ** (power - 1) / templates``). A
    fit on several wordings that minimizes it spends its steps on the wordings it fits worst,
    instead of finishing those it already fits (the reasoning of group DRO, Sagawa et al. 2020,
    smoothed)."""
    x = terms.clamp_min(0)  # [templates]; a KL a rounding error below zero counts as zero
    top = x.detach().max().clamp_min(1e-12)  # scaled by the largest term: x ** power cannot underflow
    # the mean is at least 1/templates unless every term is ~0: then clamped, its gradient 0, not nan
    return top * ((x / top) ** power).mean().clamp_min(1e-12) ** (1 / power)


def next_token_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(reference || softmax(logits))`` (reference: log-probs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - logp)).sum(-1).mean()


@torch.no_grad()
def residual_norms(model: nn.Module, windows: torch.Tensor, layers: Sequence[int]) -> dict[int, float]:
    """Median norm of the residual stream after each of ``layers`` over ``windows`` ([n, L])."""
    outs: dict[int, torch.Tensor] = {}
    with _capture(_decoder_layers(model, layers), outs, inputs=False):
        model(input_ids=windows.to(models.input_device(model)))
    return {i: float(o.float().norm(dim=-1).median()) for i, o in outs.items()}


@torch.no_grad()
def cell_norms(model: nn.Module, contexts: fields.Contexts) -> dict[str, list[float]]:
    """Per field of ``contexts`` (``"row R / LABEL"``), per decoder layer: the residual stream's
    norm entering the layer at the field's cell (its suffix's last position, where the value is
    predicted) as a multiple of the median norm over the table up to and including the cell (the
    suffix after the prompt), the median over the recorded tables. Far above 1: a massive
    activation at that cell, which a norm-bounded vector moves little and a gate trained on
    ordinary cells reads as unlike them."""
    decoder = _decoder_layers(model, range(len(models.adapter_for(model).layers(model))))
    cache, start = fields.prompt_cache(model, contexts.prompt)
    out: dict[str, list[float]] = {}
    for f in contexts.fields:
        captured: dict[int, torch.Tensor] = {}  # per layer [B, S] norms, right-padded
        with _capture(decoder, captured, inputs=True, reduce=lambda h: h.float().norm(dim=-1)):
            _logits, lengths = fields.teacher_forced(model, cache, start, list(f.suffixes))
        ratios = []
        for b, n in enumerate(lengths):
            norms = torch.stack([captured[i][b, :n] for i in decoder])  # [layers, n]: the pads left out
            ratios.append(norms[:, -1] / norms.quantile(0.5, dim=1))  # [layers]
        out[f"row {f.row} / {f.key.label}"] = torch.stack(ratios).quantile(0.5, dim=0).tolist()
    return out


def _decoder_layers(model: nn.Module, layers: Sequence[int]) -> dict[int, nn.Module]:
    decoder = models.adapter_for(model).layers(model)
    return {i: decoder[i] for i in layers}


def _mlp_writers(model: nn.Module, layers: Sequence[int]) -> dict[int, nn.Module]:
    return {i: model.get_submodule(mlp_writer_name(model, i)) for i in layers}


@contextmanager
def _capture(modules: dict[int, nn.Module], into: dict[int, torch.Tensor], inputs: bool,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Record, per index, what each module reads (``inputs``: a writer's keys, a decoder layer's
    input hidden states, positional or the ``hidden_states`` keyword) or writes (a decoder
    layer's output hidden states), ``[B, S, features]``, detached; with ``reduce``, what it
    returns instead (a norm per position keeps ``[B, S]``, not every layer's states)."""
    def keep(index: int, x: torch.Tensor) -> None:
        into[index] = x.detach() if reduce is None else reduce(x.detach())

    def hook_for(index: int) -> Callable[..., None]:
        def read(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            keep(index, args[0] if args else kwargs["hidden_states"])

        def wrote(_m: nn.Module, _a: tuple, out: torch.Tensor | tuple) -> None:
            keep(index, out[0] if isinstance(out, (tuple, list)) else out)

        return read if inputs else wrote

    handles = [m.register_forward_pre_hook(hook_for(i), with_kwargs=True) if inputs
               else m.register_forward_hook(hook_for(i)) for i, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _states_at_last_token(model: nn.Module, cache: Any, start: int, seqs: list[list[int]],
                          modules: dict[int, nn.Module], inputs: bool) -> dict[int, torch.Tensor]:
    """Per index, ``[len(seqs), features]`` float32: what ``modules`` read or wrote (see
    :func:`_capture`) at each sequence's last token, the sequences teacher-forced after the
    prompt's KV cache (``fields.prompt_cache``)."""
    captured: dict[int, torch.Tensor] = {}
    with _capture(modules, captured, inputs):
        _logits, lengths = fields.teacher_forced(model, cache, start, seqs)
    return {i: torch.stack([captured[i][b, n - 1] for b, n in enumerate(lengths)]).float() for i in modules}


@dataclass(frozen=True)
class FitTrace:
    """How the fit went: per step, before that step's update, the target term (summed over
    fields: KL in nats, or with ``loss`` "js" the JS distance), the unrelated KL and the
    importance weights' effective tables (the fewest of any field); and the steps (1-based)
    before which the contexts were re-recorded."""

    target_kl: tuple[float, ...]
    unrelated_kl: tuple[float, ...]
    seconds: float
    effective_tables: tuple[float, ...] = ()
    refreshed_before: tuple[int, ...] = ()
    reweighted: bool = False  # whether the importance weights were used (else only recorded)
    loss: str = "kl"  # what target_kl holds: "kl" (nats) or "js" (the JS distance), per field summed
    template_power: float = 1.0  # how target_kl combines the templates' terms (power_mean; 1: their mean)
    prompt_dropout: float = 0.0  # the share of instruction tokens (or words) left out each step
    last_templates: tuple[float, ...] = ()  # each template's term before the last step, in the fit's order
    prompt_dropout_unit: str = "token"  # what the dropout leaves out: "token" or "word"
    average_last: int = 1  # the edit kept: the mean of the parameters after each of the last this many steps


def fit(
    model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts], targets: Sequence[torch.Tensor],
    layers: Sequence[int], unrelated: torch.Tensor, steps: int = 30, lr: float = 0.03, kl_weight: float = 1.0,
    max_norm: float = 0.5, recontext: Callable[[Edit, int], fields.Contexts | list[fields.Contexts]] | None = None,
    refresh_every: int = 10, reweight: bool = False, lr_final: float = 1.0, units: int = 0, seed: int = 0,
    kl_batch: int | None = None, gates: dict[int, Gate] | None = None, loss: str = "kl",
    template_power: float = 1.0, prompt_dropout: float = 0.0, prompt_dropout_unit: str = "token",
    average_last: int = 1,
) -> tuple[Edit, FitTrace]:
    """Fit one added vector per layer, with ``units`` also that many new MLP units per layer,
    with ``gates`` each layer's vector switched by its gate (see the module docstring).

    Args:
        contexts: one template's recorded contexts, or several templates' (rewordings of one
            table, the same targeted fields in the same order, else ValueError): the target
            term is then the mean over templates of each one's KL, not the KL of one pooled
            marginal, where one wording's excess of a value could cancel another's shortfall.
        targets: per field of ``contexts``, the ``[values]`` target distribution.
        unrelated: ``[n, L]`` token windows of unrelated text for the side-effect term.
        kl_batch: windows of ``unrelated`` the side-effect term runs on per step, the next ones
            at each step in turn (the unedited model's next-token distributions on them computed
            then); None: all of them every step. The residual norms that scale ``lr`` and
            ``max_norm`` come from the first batch. A fit with many parameters (``units``) can
            learn to keep a few windows unchanged and not the rest of the text: more windows in
            turn show it more of the text at the same cost per step.
        lr: Adam step as a fraction of each layer's median residual norm per unit vector.
        max_norm: bound on each vector's norm as a fraction of its layer's median residual norm.
        lr_final: the step size at the last step as a fraction of ``lr``, reached by a cosine
            decay (:func:`lr_factor`; 1: constant).
        recontext: ``(edit so far, refresh number) -> contexts`` (as many templates as given)
            recorded from tables the edited model writes, called every ``refresh_every`` steps
            (and, with ``reweight``, as soon as some template's field keeps fewer than
            ``REFRESH_EFFECTIVE`` of its tables effective): the edit also changes the cells written before the targeted
            one (the names before a gender), so contexts from the unedited model alone would fit
            the targets on tables the edited model never writes.
        reweight: between refreshes, weight each table's context by how much more likely the
            edit so far makes it than the edit that wrote it (self-normalised importance
            weights ``p_now(context) / p_then(context)`` over the tokens the model drew), so the
            marginal fitted is the one of the tables the edited model would write, and the
            gradient also moves the earlier cells (a name) towards contexts that lead to the
            target. Without it (the default) each context counts alike, as if the edit left them
            unchanged; the weights are still recorded in the trace, to show how far the edit
            moved away from the tables it was fitted on. Off by default because on the bundled
            model it cost more unrelated-text agreement at the same perplexity and was no closer
            on held-out templates (README, 2026-12-04).
        units: ``k >= 1`` fits ``k`` new units per layer beside each vector
            (:class:`~prunescope.edit.hooks.Units`: a change that depends on the hidden state,
            folded by widening the MLP; they start writing nothing, so the fit starts as the
            vector fit does), their gate and up rows drawn with ``seed``; 0 (the default): the
            vectors alone. ``lr`` is then also a fraction of each gate and up row's size, and of
            the residual norm per unit activation for ``down``; ``max_norm`` bounds the vectors
            only.
        gates: per layer, a fixed :class:`~prunescope.edit.hooks.Gate` (from :func:`gate_probe`)
            that switches the layer's vector; every layer in ``layers`` needs one, and they do
            not combine with ``units``. The vector then moves only what the gate lets through:
            the side-effect term sees the text the gate keeps shut.
        loss: the target term per field: "kl" (the default), ``KL(target || model)``; "js",
            the Jensen-Shannon distance the report measures (:func:`js_to`): the fit then
            minimizes the report's figure on its own templates, each field's gradient scaled up
            the closer that field is (a lone stray mass ``m`` reads ``sqrt(m / 2)``, not ``m``).
        template_power: how the templates' terms combine (:func:`power_mean`): 1 (the default)
            their mean; larger (a finite number) weighs the templates the edit fits worst more.
            One template: its term, whatever the power.
        prompt_dropout: each step, each instruction token of each template's prompt is left out
            with this probability (``[0, 1)``; drawn with ``seed``;
            :func:`~prunescope.edit.fields.with_thinned_instruction`): the target term is read after
            a new thinning of every instruction at each step, so the vectors are fitted to work
            after many variants of each wording instead of after its exact words. 0 (the
            default): the prompts as recorded. Contexts without a known instruction span are
            read as recorded. Not with ``reweight``: the importance weights would compare the
            drawn tokens' probability after one thinning with that after another.
        prompt_dropout_unit: what ``prompt_dropout`` leaves out: "token" (the default) or "word"
            (a word's tokens together, as a rewording would: a token alone can split a word,
            "markdown" -> "mark").
        average_last: the edit returned is the mean of the parameters (vectors, units) after
            each of the last ``average_last`` steps (an integer in ``1..steps``; 1, the default:
            the last step's). Each step reads new tables every ``refresh_every`` steps, and with
            ``prompt_dropout`` new thinnings, so the last step's vectors carry that step's noise;
            their mean over the last steps keeps where the steps hover instead (Polyak
            averaging; the mean of vectors within the norm bound is within it).
    """
    import time

    start = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # the model is frozen; restored below
    batch = len(unrelated) if kl_batch is None else kl_batch
    if not 1 <= batch <= len(unrelated):
        raise ValueError(f"kl_batch {kl_batch} must lie in 1..{len(unrelated)} (the unrelated windows)")
    if gates is not None and units:
        raise ValueError("gates and units do not combine: a gated vector is written by two units of its own")
    if gates is not None and set(gates) != set(layers):
        raise ValueError(f"gates need one gate per fitted layer: layers {sorted(layers)}, gates for {sorted(gates)}")
    if loss not in TARGET_LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {', '.join(TARGET_LOSSES)}")
    if not math.isfinite(template_power) or template_power < 1:
        raise ValueError(f"template_power must be a finite number >= 1, got {template_power!r}")
    if not 0 <= prompt_dropout < 1:
        raise ValueError(f"prompt_dropout must lie in [0, 1), got {prompt_dropout!r}")
    if prompt_dropout and reweight:
        raise ValueError("prompt_dropout and reweight do not combine: the weights would compare two thinnings")
    if not isinstance(average_last, int) or not 1 <= average_last <= steps:
        raise ValueError(f"average_last must be an integer in 1..steps ({steps}), got {average_last!r}")
    if prompt_dropout_unit not in fields.THINNING_UNITS:
        raise ValueError(f"prompt_dropout_unit {prompt_dropout_unit!r} is not one of "
                         f"{', '.join(fields.THINNING_UNITS)}")
    options = _FitOptions(steps, lr, kl_weight, max_norm, refresh_every, reweight, lr_final, units, seed, batch,
                          gates, loss, template_power, prompt_dropout, prompt_dropout_unit, average_last)
    try:
        return _fit(model, _listed(contexts), targets, layers, unrelated, options, recontext, start)
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass(frozen=True)
class _FitOptions:
    """The fit's settings (:func:`fit`'s arguments of the same names)."""

    steps: int
    lr: float
    kl_weight: float
    max_norm: float
    refresh_every: int
    reweight: bool
    lr_final: float
    units: int
    seed: int
    kl_batch: int
    gates: dict[int, Gate] | None = None
    loss: str = "kl"
    template_power: float = 1.0
    prompt_dropout: float = 0.0
    prompt_dropout_unit: str = "token"
    average_last: int = 1


def _listed(contexts: fields.Contexts | Sequence[fields.Contexts]) -> list[fields.Contexts]:
    """One template's contexts as a list of one; several templates' as they are."""
    return [contexts] if isinstance(contexts, fields.Contexts) else list(contexts)


@dataclass
class _Readout:
    """What the fit keeps between steps about its current contexts (one entry per template,
    then per field): the drawn tokens' log-probability under the edit that wrote them, and the
    unedited model's share of cells holding none of the values."""

    written_by: list[list[torch.Tensor]] | None = None
    elsewhere: list[list[float]] | None = None


def _target_term(model: nn.Module, contexts: list[fields.Contexts], targets: Sequence[torch.Tensor],
                 kept: _Readout, reweight: bool, loss: str = "kl",
                 power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The fit's target term (the ``power`` mean over templates of the ``loss`` summed over fields)
    with the edit as applied now, and each template's term ``[templates]``; the importance
    weights' fewest effective tables of any template and field, and the smallest share of its
    recorded tables any template's field keeps effective."""
    reads = [fields.readout(model, c) for c in contexts]  # per template, per field: ([T, C], [T])
    if kept.written_by is None:  # the vectors now are those the contexts were written with
        kept.written_by = [[drawn.detach() for _p, drawn in read] for read in reads]
    log_w = [[drawn - then for (_p, drawn), then in zip(read, wb)] for read, wb in zip(reads, kept.written_by)]
    masses = [[fields.mass(p, w if reweight else None) for (p, _d), w in zip(read, lw)]
              for read, lw in zip(reads, log_w)]  # per template, per field: [C]
    if kept.elsewhere is None:
        kept.elsewhere = [[float((1 - m.detach().sum()).clamp(0, 1)) for m in ms] for ms in masses]
    per_field = TARGET_LOSSES[loss]
    per_template = [torch.stack([per_field(*_with_elsewhere(t, m, e)) for t, m, e in zip(targets, ms, es)]).sum()
                    for ms, es in zip(masses, kept.elsewhere)]
    effective = [fields.effective_tables(w) for lw in log_w for w in lw]
    recorded = [len(f.suffixes) for c in contexts for f in c.fields]
    terms = torch.stack(per_template)  # [templates]
    return (power_mean(terms, power), terms.detach(), min(effective),
            min(e / n for e, n in zip(effective, recorded, strict=True)))


def _fit(
    model: nn.Module, contexts: list[fields.Contexts], targets: Sequence[torch.Tensor], layers: Sequence[int],
    unrelated: torch.Tensor, options: _FitOptions,
    recontext: Callable[[Edit, int], fields.Contexts | list[fields.Contexts]] | None, start: float,
) -> tuple[Edit, FitTrace]:
    import time

    o = options
    device = models.input_device(model)
    windows = _KLWindows(model, unrelated, o.kl_batch)
    norms = residual_norms(model, windows.first, layers)
    edit, groups = _vector_params(model, layers, o.lr, norms, o.gates)
    if o.units:
        edit, groups = _with_units(model, edit, groups, o, norms, windows.first)
    opt = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, o.steps, o.lr_final))
    target_kl, unrelated_kl, effective = [], [], []
    kept = _Readout()
    refreshed, since, share, terms = [], 0, 1.0, torch.zeros(0)
    layout = _check_aligned(contexts, targets)
    thinning = torch.Generator().manual_seed(o.seed)  # the prompt dropout's draws
    mean = _LastSteps([p for group in groups for p in group["params"]], o.steps, o.average_last)
    offloaded = models.is_offloaded(model)  # then backward holds one layer's weights at a time
    for _step in tqdm(range(o.steps), desc="fit", unit="step", leave=False):
        if recontext is not None and _step and _due(since, o.refresh_every, share if o.reweight else None):
            refreshed.append(_step + 1)
            since = 0
            with torch.no_grad():
                contexts = _listed(recontext(edit.detached(), len(refreshed)))
            if _check_aligned(contexts, targets) != layout:
                raise ValueError("recontext returned other templates or fields than the fit started with")
            kept.written_by = None  # the elsewhere shares stay the unedited model's
        since += 1
        batch, reference = windows.at(_step) if o.kl_weight else (None, None)
        recompute = models.recomputed_layers(model) if offloaded else nullcontext()
        with applied(model, edit), recompute:  # backward inside: the recomputation reruns the hooks
            shown = [fields.with_thinned_instruction(c, o.prompt_dropout, thinning, o.prompt_dropout_unit)
                     for c in contexts]
            tkl, terms, fewest, share = _target_term(model, shown, targets, kept, o.reweight, o.loss,
                                                     o.template_power)
            ukl = next_token_kl(reference, model(input_ids=batch).logits) if batch is not None \
                else torch.zeros((), device=device)
            loss = tkl + o.kl_weight * ukl
            opt.zero_grad()
            loss.backward()
        opt.step()
        schedule.step()
        _bound(edit, o.max_norm, norms)
        mean.add(_step)
        target_kl.append(float(tkl.detach()))
        unrelated_kl.append(float(ukl.detach()))
        effective.append(fewest)
        log.info("fit step %d: target %s %.4f, unrelated KL %.5f, effective tables %.1f of %d", _step + 1,
                 o.loss.upper(), target_kl[-1], unrelated_kl[-1], effective[-1], _fewest_tables(contexts))
    mean.put()
    return edit.detached(), FitTrace(tuple(target_kl), tuple(unrelated_kl), time.perf_counter() - start,
                                     tuple(effective), tuple(refreshed), o.reweight, o.loss, o.template_power,
                                     o.prompt_dropout, tuple(terms.tolist()), o.prompt_dropout_unit,
                                     o.average_last)


class _LastSteps:
    """The running mean of the fitted ``params`` after each of the last ``last`` of ``steps``
    steps (:func:`fit`'s ``average_last``), put back into them at the end."""

    def __init__(self, params: list[torch.Tensor], steps: int, last: int) -> None:
        self.params, self.first, self.count = params, steps - last, 0
        self.mean: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, step: int) -> None:
        """Count the parameters after ``step`` (0-based) when it is one of the last."""
        if step < self.first:
            return
        self.count += 1
        if self.count == 1:
            self.mean = [p.detach().clone() for p in self.params]
            return
        for m, p in zip(self.mean, self.params):
            m.add_(p.detach() - m, alpha=1 / self.count)  # the running mean

    @torch.no_grad()
    def put(self) -> None:
        """Set the parameters to their mean over the steps counted (unchanged after one step)."""
        if self.count <= 1:
            return
        for m, p in zip(self.mean, self.params):
            p.copy_(m)


class _KLWindows:
    """The side-effect term's windows, ``size`` per step in turn, with the unedited model's
    next-token log-probabilities on them (kept when one batch is all there is, else computed at
    each step: ``[n, L, V]`` for every window would be large)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, size: int) -> None:
        self.model, self.size = model, size
        self.windows = windows.to(models.input_device(model))  # [n, L]
        self.first = self.windows[:size]
        self._kept: torch.Tensor | None = None

    @torch.no_grad()
    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s windows ``[size, L]`` and the unedited model's log-probs ``[size, L, V]``
        on them (the caller applies no edit while this runs)."""
        n = len(self.windows)
        if self.size == n and self._kept is not None:
            return self.windows, self._kept
        rows = [(step * self.size + j) % n for j in range(self.size)]
        batch = self.windows[rows]
        reference = torch.log_softmax(self.model(input_ids=batch).logits.float(), dim=-1)
        if self.size == n:
            self._kept = reference
        return batch, reference


def _vector_params(model: nn.Module, layers: Sequence[int], lr: float, norms: dict[int, float],
                   gates: dict[int, Gate] | None = None) -> tuple[Edit, list[dict[str, Any]]]:
    """The fit's added vectors (zeros; switched by ``gates`` where given) as a live edit, and their
    Adam groups: the step per coordinate ``lr`` x the layer's median residual norm / sqrt(hidden)."""
    hidden = model.config.hidden_size
    device = models.input_device(model)
    vectors = {i: torch.zeros(hidden, device=device, requires_grad=True) for i in layers}
    scale = torch.tensor([norms[i] for i in layers]) / hidden ** 0.5  # float32, as the published fits used
    groups = [{"params": [vectors[i]], "lr": lr * float(s)} for i, s in zip(layers, scale)]
    gates = gates or {}
    return Edit([LayerEdit(i, add=vectors[i], gate=gates.get(i)) for i in layers]), groups


def _with_units(model: nn.Module, edit: Edit, groups: list[dict[str, Any]], o: _FitOptions,
                norms: dict[int, float], windows: torch.Tensor) -> tuple[Edit, list[dict[str, Any]]]:
    """``edit`` with ``o.units`` new units (:func:`hooks.new_units`) in each layer beside its
    vector, and the Adam groups with theirs: gate and up rows step by ``lr`` x their entries'
    size; ``down`` by ``lr`` x the layer's median residual norm / sqrt(hidden), divided by the
    units' RMS activation on ``windows`` at the start, so one step moves what they write about
    as far as a step moves the vector."""
    generator = torch.Generator().manual_seed(o.seed)
    layers = [e.layer for e in edit.layers]
    units = {i: hooks.new_units(model, i, o.units, generator) for i in layers}
    inputs: dict[int, torch.Tensor] = {}
    with torch.no_grad(), _capture({i: hooks.mlp_module(model, i) for i in layers}, inputs, inputs=True):
        model(input_ids=windows.to(models.input_device(model)))
    hidden = model.config.hidden_size
    groups = list(groups)
    for i, u in units.items():
        with torch.no_grad():
            rms = float(hooks.unit_values(model, i, u, inputs[i]).float().pow(2).mean().sqrt())  # inputs [n, L, hidden]
        groups += [{"params": [u.gate], "lr": o.lr * float(u.gate.detach().std())},
                   {"params": [u.up], "lr": o.lr * float(u.up.detach().std())},
                   {"params": [u.down], "lr": o.lr * norms[i] / hidden ** 0.5 / max(rms, 1e-12)}]
    return Edit([dataclasses.replace(e, units=units[e.layer]) for e in edit.layers]), groups


@torch.no_grad()
def _bound(edit: Edit, max_norm: float, norms: dict[int, float]) -> None:
    """Scale each added vector down to ``max_norm`` x its layer's median residual norm where it is longer."""
    for e in edit.layers:
        if e.add is None:
            continue
        bound, n = max_norm * norms[e.layer], float(e.add.norm())
        if n > bound:
            e.add.mul_(bound / n)


def lr_factor(step: int, steps: int, final: float) -> float:
    """The fit's step size at ``step`` (0-based, of ``steps``) as a fraction of the first: a
    cosine from 1 at the first step to ``final`` at the last. Large early steps move the vectors
    to the targets fast; small late ones let them settle where the target and the unrelated-text
    terms balance instead of circling it. On the bundled model a decay to 0.1 came no closer on
    held-out templates at the same perplexity (farther in 30 steps, within the noise in 60), so
    the constant step (``final=1``) stays the default (README, 2026-12-06)."""
    if steps <= 1:
        return 1.0
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, steps - 1) / (steps - 1)))


def _with_elsewhere(target: torch.Tensor, mass: torch.Tensor, elsewhere: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The target and the edited model's field mass ``[values]`` extended by one outcome: "the
    cell holds none of the values". Its target is the unedited model's own share ``elsewhere``,
    so the fit cannot reach a target by breaking the cell (a renormalised distribution would not
    see the lost mass; measured: without this term a fit kept 2% of its gender cells valid)."""
    t = torch.cat([target.to(mass) * (1 - elsewhere), mass.new_tensor([elsewhere])])  # [C + 1]
    q = torch.cat([mass, (1 - mass.sum()).clamp_min(1e-12)[None]])  # [C + 1]
    return t, q


def _fewest_tables(contexts: list[fields.Contexts]) -> int:
    """The fewest recorded tables any template's field has."""
    return min(len(f.suffixes) for c in contexts for f in c.fields)


def _check_aligned(contexts: list[fields.Contexts], targets: Sequence[torch.Tensor]) -> tuple:
    """The templates' common field layout ``(count, ((row, field), ...))``; a ValueError when the
    templates' fields differ or do not match ``targets`` one to one (the fit pairs them by position)."""
    layouts = {tuple((f.row, f.key) for f in c.fields) for c in contexts}
    if len(layouts) != 1:
        raise ValueError(f"the fit's templates record different fields: {sorted(map(str, layouts))}")
    (layout,) = layouts
    if len(layout) != len(targets):
        raise ValueError(f"{len(targets)} targets for {len(layout)} recorded fields")
    return len(contexts), layout


def _due(since: int, every: int, share: float | None) -> bool:
    """Whether the fit re-records its contexts now: ``every`` steps after the last recording, or
    sooner when the importance weights have degenerated (``share``: the smallest fraction of its
    recorded tables any template's field keeps effective, below ``REFRESH_EFFECTIVE``: a handful
    of contexts would stand for all)."""
    return since >= every or (share is not None and share < REFRESH_EFFECTIVE)


GATE_SPAN = 8.0  # the gate's u rises from off (0) to on (8): g = (act(u) - act(u - 8)) / 8
GATE_SHARPNESS = 2.0  # u = 2 x the classifier's logit: the gate is open where the classifier says
# "table" with probability above 0.982 (logit 4) and shut where it says "text" (logit below 0)


@torch.no_grad()
def table_inputs(model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts],
                 layers: Sequence[int], cells_only: bool = False) -> dict[int, torch.Tensor]:
    """Per layer, ``[positions, hidden]`` float32: the MLP's input at every position of every
    recorded table (each field's suffix: the table written after the shared prompt, up to the
    field's cell), over every template in ``contexts``; with ``cells_only`` at each suffix's
    last position alone (where the field's value is predicted). The prompt's own positions are
    left out: they are the instruction, not the table."""
    modules = {i: hooks.mlp_module(model, i) for i in layers}
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for one in _listed(contexts):
        cache, start = fields.prompt_cache(model, one.prompt)
        seqs = [s for f in one.fields for s in f.suffixes]
        captured: dict[int, torch.Tensor] = {}
        with _capture(modules, captured, inputs=True):
            _logits, lengths = fields.teacher_forced(model, cache, start, seqs)
        for i in layers:  # captured[i]: [B, S, hidden], right-padded
            kept = [captured[i][b, n - 1:n] if cells_only else captured[i][b, :n] for b, n in enumerate(lengths)]
            out[i].append(torch.cat(kept).float())
    return {i: torch.cat(v) for i, v in out.items()}


@torch.no_grad()
def text_inputs(model: nn.Module, windows: torch.Tensor, layers: Sequence[int], batch: int = 8,
                ) -> dict[int, torch.Tensor]:
    """Per layer, ``[n * L, hidden]`` float32: the MLP's input at every position of ``windows``
    (``[n, L]`` tokens), run ``batch`` windows at a time without the full logits."""
    modules = {i: hooks.mlp_module(model, i) for i in layers}
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    device = models.input_device(model)
    for chunk in windows.split(batch):
        captured: dict[int, torch.Tensor] = {}
        with _capture(modules, captured, inputs=True):
            model(input_ids=chunk.to(device), logits_to_keep=1)
        for i in layers:
            out[i].append(captured[i].reshape(-1, captured[i].shape[-1]).float())
    return {i: torch.cat(v) for i, v in out.items()}


def logistic(positive: torch.Tensor, negative: torch.Tensor | Sequence[torch.Tensor], l2: float = 1e-3,
             iterations: int = 200) -> tuple[torch.Tensor, float]:
    """A linear classifier ``logit = w . x + b`` of ``positive`` ``[P, d]`` against ``negative``
    rows (``[N, d]``, or several groups ``[N_k, d]``): logistic loss with the two classes weighted
    alike (a few hundred table positions against thousands of text positions) and, within the
    negative class, each group alike (a few hundred positions of other tables count as much as
    thousands of text positions), ``l2`` x ``|w|^2`` on standardized features, L-BFGS in float64
    on the CPU; returned with the standardization folded in (``w [d]`` float32 on ``positive``'s
    device, ``b``)."""
    device = positive.device
    groups = [negative] if isinstance(negative, torch.Tensor) else list(negative)
    if not groups or any(len(g) == 0 for g in groups) or len(positive) == 0:
        raise ValueError("logistic needs positive rows and at least one negative row in each group")
    x = torch.cat([positive, *groups]).cpu().double()  # [P + N, d]: on the CPU (float64 everywhere, MPS too)
    y = torch.cat([x.new_ones(len(positive)), x.new_zeros(len(x) - len(positive))])  # [P + N]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # [d]
    z = (x - mean) / std
    weight = torch.cat([x.new_full((len(positive),), 0.5 / len(positive)),
                        *(x.new_full((len(g),), 0.5 / len(groups) / len(g)) for g in groups)])  # [P + N], sums to 1
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight * nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none")).sum()
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w.detach() / std)  # [d]: logit = (x - mean) / std . w + b
    return w_raw.float().to(device), float(b.detach() - mean @ w_raw)


def gate_probe(model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts], windows: torch.Tensor,
               layers: Sequence[int], negatives: Sequence[fields.Contexts] = (), span: float = GATE_SPAN,
               sharpness: float = GATE_SHARPNESS) -> dict[int, Gate]:
    """Per layer, a :class:`~prunescope.edit.hooks.Gate` on the MLP's input that opens at the
    recorded tables' positions and stays shut on ``windows`` of unrelated text and on the tables
    of ``negatives`` (other templates' recorded tables, when given): :func:`train_gates` on
    :func:`table_inputs` against :func:`text_inputs` (the fit's windows; the side effects are
    measured on other text) and each negative template's table inputs, one group each. The gate is only as specific as
    these samples: text like the tables the classifier never saw (another table, another chat)
    may open it too."""
    negative = [text_inputs(model, windows, layers), *(table_inputs(model, [c], layers) for c in negatives)]
    return train_gates(model, table_inputs(model, contexts, layers), negative, span, sharpness)


def train_gates(model: nn.Module, positive: dict[int, torch.Tensor], negative: Sequence[dict[int, torch.Tensor]],
                span: float = GATE_SPAN, sharpness: float = GATE_SHARPNESS) -> dict[int, Gate]:
    """Per layer of ``positive`` (``layer -> [P, hidden]`` MLP inputs where the gate should open),
    a :class:`~prunescope.edit.hooks.Gate` whose ``u`` is ``sharpness`` x the logit of
    :func:`logistic` against the groups of ``negative`` (each ``layer -> [N_k, hidden]``, where it
    should stay shut; each group weighted alike)."""
    gates = {}
    for i, pos in positive.items():
        w, b = logistic(pos, [g[i] for g in negative])
        gates[i] = Gate(sharpness * w, sharpness * b, span)
        shut = ", ".join(f"{gate_share(model, i, gates[i], g[i]):.4f} of {len(g[i])}" for g in negative)
        log.info("layer %d gate: open (g > 0.5) at %.3f of %d table positions; at %s negative positions", i,
                 gate_share(model, i, gates[i], pos), len(pos), shut)
    return gates


@torch.no_grad()
def gate_values(model: nn.Module, layer: int, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """``[...]``: how far ``gate`` lets decoder layer ``layer``'s vector through at MLP inputs ``x``
    ``[..., hidden]`` (0 shut, 1 open), with the layer's own activation."""
    units = gate.units(x.new_ones(x.shape[-1]))  # its two units' values sum to g(x) (down is not read)
    return hooks.unit_values(model, layer, units, x).sum(-1)


def gate_share(model: nn.Module, layer: int, gate: Gate, x: torch.Tensor) -> float:
    """The share of the rows of ``x`` ``[n, hidden]`` where ``gate`` is more than half open."""
    return float((gate_values(model, layer, gate, x) > 0.5).float().mean())


@torch.no_grad()
def contrast(
    model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts], targets: Sequence[torch.Tensor],
    layers: Sequence[int],
) -> dict[int, torch.Tensor]:
    """Per layer, ``[hidden]``: the residual after the value's last token weighted by the target
    minus weighted by the model's own marginal, averaged over each template's tables, summed over
    fields, then averaged over the templates (each counts alike, whatever its tables)."""
    listed = _listed(contexts)
    device = models.input_device(model)
    out = {i: torch.zeros(model.config.hidden_size, device=device) for i in layers}
    decoder = _decoder_layers(model, layers)
    for one in listed:
        own = [q.detach() for q in fields.marginals(model, one)]
        cache, start = fields.prompt_cache(model, one.prompt)
        for field, target, q in zip(one.fields, targets, own):
            weights = (target.to(q) - q)  # [C]: wanted minus preferred
            seqs = [s + per_value[0] for s in field.suffixes for per_value in field.continuations]
            last = _states_at_last_token(model, cache, start, seqs, decoder, inputs=False)  # i -> [T*C, hidden]
            values = len(field.continuations)
            for i in layers:
                per = last[i].view(len(field.suffixes), values, -1)  # [T, C, hidden]
                out[i] += (weights[None, :, None].to(per) * per).sum(1).mean(0) / len(listed)
    return out


def caa_edit(vectors: dict[int, torch.Tensor], strength: float, norms: dict[int, float]) -> Edit:
    """The contrast directions added at their layers with norm ``strength`` x the layer's median
    residual norm (``norms``), the scale the fit's norm bound uses. The raw difference has no
    useful scale of its own here: added as it is at layers 7-11 of the bundled model, perplexity
    went from 14.9 to about 87,000 (measured)."""
    return Edit([LayerEdit(i, add=v / v.norm().clamp_min(1e-12) * strength * norms[i]) for i, v in vectors.items()])


def ablate_edit(vectors: dict[int, torch.Tensor], strength: float) -> Edit:
    """The contrast directions projected out of both writers (``strength`` = fraction removed;
    2 reflects the component)."""
    return Edit([LayerEdit(i, direction=v / v.norm().clamp_min(1e-12), ablate_scale=strength)
                 for i, v in vectors.items()])


@dataclass(frozen=True)
class WeightEdit:
    """Rank-one updates ``delta[layer] = [hidden, intermediate]`` of the MLP writers."""

    deltas: dict[int, torch.Tensor]

    def scaled(self, strength: float) -> "WeightEdit":
        return WeightEdit({i: d * strength for i, d in self.deltas.items()})

    def named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The deltas by the MLP writers' module names (what :mod:`prunescope.pruning.apply` takes)."""
        return {mlp_writer_name(model, i): d for i, d in self.deltas.items()}

    @contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        """The deltas applied within the block by forward hooks on the writers (``output + input
        delta^T``): the function of the added weights up to rounding, for weights that cannot
        change in place (kept on disk by accelerate)."""

        def add(delta: torch.Tensor) -> Callable[..., torch.Tensor]:
            def hook(_module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
                x = args[0]  # [..., intermediate]
                return out + nn.functional.linear(x, delta.to(device=x.device, dtype=x.dtype))  # [..., hidden]
            return hook

        handles = [model.get_submodule(name).register_forward_hook(add(d)) for name, d in self.named(model).items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def weight_edit(
    model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts], vectors: dict[int, torch.Tensor],
    unrelated: torch.Tensor, null: bool = False, damp: float = 1e-2, null_fraction: float = 1e-2,
) -> WeightEdit:
    """Rank-one ``delta = v u^T`` per layer with ``u^T k_f = 1`` for the mean key ``k_f`` of every
    targeted field ``f`` (the writer's input at the field's last context token, over the tables
    of every template in ``contexts``): the writer adds ``v`` at each targeted cell.

    ROME's metric: ``u = C^-1 K (K^T C^-1 K)^-1 1``, ``C`` the (dampened) second moment of the
    writer's input over ``unrelated`` text: the smallest change of other keys' outputs on
    average. ``null`` (AlphaEdit's projection): ``C^-1`` replaced by the projector ``P`` on the
    eigenvectors of ``C`` whose eigenvalues are below ``null_fraction`` of the largest, so keys
    like the sampled unrelated ones barely change their outputs. The keys come from the
    unedited model (earlier layers' edits are not taken into account).
    """
    layers = list(vectors)
    keys = _field_keys(model, contexts, layers)
    covariances = _key_covariance(model, unrelated, layers)
    deltas = {}
    for i in layers:
        k = keys[i].double()  # [inter, F]
        c = covariances[i]  # [inter, inter] float64
        if null:
            evals, evecs = torch.linalg.eigh(c)
            basis = evecs[:, evals < null_fraction * evals.max()]  # [inter, r]
            if basis.shape[1] == 0:
                log.warning("layer %d: the unrelated keys span every direction; the null-space edit is empty", i)
            metric_k = basis @ (basis.T @ k)  # P K
        else:
            c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
            metric_k = torch.linalg.solve(c, k)  # C^-1 K
        gram = k.T @ metric_k  # [F, F]
        ones = torch.ones(k.shape[1], 1, dtype=k.dtype, device=k.device)
        u = (metric_k @ torch.linalg.lstsq(gram, ones).solution)[:, 0]  # [inter]
        deltas[i] = torch.outer(vectors[i].double(), u).float()  # [hidden, inter]
    return WeightEdit(deltas)


def _field_keys(model: nn.Module, contexts: fields.Contexts | Sequence[fields.Contexts],
                layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer, ``[inter, fields]``: each field's MLP writer input at its last context token,
    averaged over each template's tables, then over the templates (each counts alike)."""
    listed = _listed(contexts)
    per_template: list[dict[int, torch.Tensor]] = []
    writers = _mlp_writers(model, layers)
    for one in listed:
        keys: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        cache, start = fields.prompt_cache(model, one.prompt)
        for field in one.fields:
            last = _states_at_last_token(model, cache, start, list(field.suffixes), writers, inputs=True)  # [T, inter]
            for i in layers:
                keys[i].append(last[i].mean(0))
        per_template.append({i: torch.stack(v, dim=1) for i, v in keys.items()})  # i -> [inter, F]
    return {i: torch.stack([k[i] for k in per_template]).mean(0) for i in layers}


def _key_covariance(model: nn.Module, windows: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer, ``E[k k^T]`` (float64) of the MLP writer's input over ``windows``."""
    captured: dict[int, torch.Tensor] = {}
    with _capture(_mlp_writers(model, layers), captured, inputs=True):
        model(input_ids=windows.to(models.input_device(model)))
    out = {}
    for i in layers:
        k = captured[i].reshape(-1, captured[i].shape[-1]).double()  # [tokens, inter]
        out[i] = k.T @ k / k.shape[0]
    return out


def mlp_writer_name(model: nn.Module, index: int) -> str:
    """The full module name of decoder layer ``index``'s MLP writer (``down_proj``)."""
    from prunescope import families

    path = families.family_for(model).layouts(model.config)[families.MLP].writer
    return f"{models.adapter_for(model).layers_path}.{index}.{path}"

