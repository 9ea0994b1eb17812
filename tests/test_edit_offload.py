"""``prunescope edit --offload``: the weights on disk (accelerate's dispatch), every kind measured
as in memory, and the fit's backward holding no layer's weights (each layer run again)."""

from __future__ import annotations

import json

import pytest
import torch

from prunescope import cli, models
from prunescope.edit.job import KINDS


def _loss_and_grads(model: torch.nn.Module, saved: list[tuple[int, ...]] | None = None
                    ) -> tuple[float, list[torch.Tensor]]:
    """A loss read as the fit reads its contexts (the shared prompt's KV cache, grown layer by
    layer, then continuations teacher-forced after it from a repeated cache) and on a window of
    text, with a vector added after layer 0 and two new MLP units in layer 1 (hooks inside the
    layer); its value and the gradients of the vector and the units' tensors. ``saved`` receives
    the shape of every tensor autograd keeps for backward."""
    from prunescope.edit import fields, hooks
    from prunescope.edit.hooks import Edit, LayerEdit, applied

    model.requires_grad_(False)  # frozen, as the fit freezes it
    vector = torch.full((model.config.hidden_size,), 0.1, requires_grad=True)  # [hidden]
    units = hooks.new_units(model, 1, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        units.down.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # [hidden, 2]: they write
    edit = Edit([LayerEdit(0, add=vector), LayerEdit(1, units=units)])

    def keep(t: torch.Tensor) -> torch.Tensor:
        if saved is not None:
            saved.append(tuple(t.shape))
        return t

    with applied(model, edit), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        cache, start = fields.prompt_cache(model, tuple(range(3, 15)))
        logits, _lengths = fields.teacher_forced(model, cache, start, [(20, 21, 22), (30, 31)])  # [2, 3, V]
        text = model(input_ids=torch.arange(40, 56).unsqueeze(0)).logits  # [1, 16, V]
        loss = logits.logsumexp(-1).mean() - logits[..., 3].mean() + text.logsumexp(-1).mean() - text[..., 5].mean()
        loss.backward()
    return float(loss.detach()), [vector.grad, units.gate.grad, units.up.grad, units.down.grad]


def test_recomputed_layers_keep_no_weight_for_backward(digit_model_dir):
    """On a model whose weights are on disk, backward through :func:`models.recomputed_layers`
    gives the in-memory loss and gradients (through the prompt's cache, the repeated cache and
    hooks inside the layers) while autograd keeps no tensor shaped like a weight matrix (it keeps
    the layers' and the head's inputs); without it autograd keeps them (what it would hold of a
    model larger than memory)."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(digit_model_dir).eval()
    loss, grads = _loss_and_grads(whole)
    offloaded, _tok = models.load(str(digit_model_dir), device="cpu", offload=True)
    assert models.is_offloaded(offloaded) and not models.is_offloaded(whole)
    matrices = {s for p in whole.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    plain: list[tuple[int, ...]] = []
    assert _loss_and_grads(offloaded, plain)[0] == pytest.approx(loss, rel=1e-6)
    assert matrices & set(plain)  # the weights, held by the graph
    layer = models.adapter_for(offloaded).layers(offloaded)[0]
    own = layer.__dict__.get("forward")  # accelerate's wrapper
    kept: list[tuple[int, ...]] = []
    with models.recomputed_layers(offloaded):
        got_loss, got_grads = _loss_and_grads(offloaded, kept)
    assert got_loss == pytest.approx(loss, rel=1e-6)
    for got, want in zip(got_grads, grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not matrices & set(kept) and (1, 16, whole.config.hidden_size) in kept
    assert layer.__dict__.get("forward") is own  # put back


def _memory_and_disk(model_dir, tmp_path, monkeypatch, kinds: str, *extra: str) -> tuple[dict, dict]:
    """The reports of one tiny edit run in memory and the same with ``--offload``; checks that
    only the second recomputed layers (ran them under ``torch.utils.checkpoint``)."""
    import torch.utils.checkpoint

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 50} and {i}" for i in range(600)))
    original, calls = torch.utils.checkpoint.checkpoint, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    reports = []
    for name, offload in (("memory", []), ("disk", ["--offload"])):
        calls.clear()
        out = tmp_path / name
        rc = cli.main(["-q", "edit", str(model_dir), "--target", "Gender=uniform", "--target",
                       "Age.digit1=uniform:2-6", "--method", kinds, "--units", "2", "--layers", "0-1", "--steps", "2",
                       "--fit-tables", "2", "--fit-rewordings", "1", "--measure-tables", "2", "--strength", "1",
                       "--eval-text", str(text), "--eval-tokens", "512", "--eval-seqlen", "16", "--out", str(out),
                       *extra, *offload])
        assert rc == 0
        assert bool(calls) == bool(offload), (name, len(calls))
        reports.append(json.loads((out / "report.json").read_text()))
    return reports[0], reports[1]


def _assert_same_figures(memory: dict, disk: dict, rel: float) -> None:
    for a, b in zip(memory["results"], disk["results"], strict=True):
        for key in ("target_js_after", "target_js_heldout", "ppl_after", "kl_unrelated", "top1_agreement",
                    "other_fields_js"):
            same = b[key] is None if a[key] is None else b[key] == pytest.approx(a[key], rel=rel, abs=1e-8)
            assert same, (a["kind"], key, a[key], b[key])
    for trace in ("fit_trace", "units_trace", "gated_trace"):
        if memory[trace] is not None:
            assert disk[trace]["target_kl"] == pytest.approx(memory[trace]["target_kl"], rel=rel)


def test_cli_edit_with_offload_gives_the_in_memory_report(digit_model_dir, tmp_path, monkeypatch):
    """Every kind, measured with the weights on disk, reads as in memory (the weight kinds applied
    by hooks there, added to the weights here: equal up to rounding)."""
    memory, disk = _memory_and_disk(digit_model_dir, tmp_path, monkeypatch, "all")
    assert [r["kind"] for r in disk["results"]] == list(KINDS)
    assert all(abs(r["target_js_after"] - r["target_js_before"]) > 3e-4 for r in disk["results"])  # each one acts
    _assert_same_figures(memory, disk, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_cli_edit_with_offload_on_cuda_gives_the_in_memory_report(digit_model_dir, tmp_path, monkeypatch):
    """The same on a CUDA device: the weights read from disk onto it, the edit's tensors there."""
    memory, disk = _memory_and_disk(digit_model_dir, tmp_path, monkeypatch, "fit,gated,weight", "--device", "cuda")
    _assert_same_figures(memory, disk, rel=1e-3)


def test_only_dynamic_caches_are_put_back_for_the_recomputation():
    """A cache that could write into its tensors in place (any other class) is refused in one
    line rather than given to a recomputation that might read changed keys."""
    from transformers.cache_utils import DynamicCache

    from prunescope.errors import PrunescopeError

    class Other(DynamicCache):
        pass

    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)  # [B, kv heads, T, d]
    restore = models._cache_restorer(cache)
    cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), 0)
    cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), 1)  # a layer grown after the snapshot
    restore()
    assert len(cache.layers) == 1 and cache.layers[0].keys.shape == (1, 2, 3, 4)
    with pytest.raises(PrunescopeError, match="cannot recompute decoder layers that write into a Other"):
        models._cache_restorer(Other())
