"""``prunescope edit --offload``: the weights on disk (accelerate's dispatch), every kind measured
as in memory, and the fit's backward holding no layer's weights (each layer run again)."""

from __future__ import annotations

import json

import pytest
import torch

from prunescope import cli, models
from prunescope.edit.job import KINDS


def _loss_and_grad(model: torch.nn.Module, ids: torch.Tensor, saved: list[tuple[int, ...]] | None = None
                   ) -> tuple[float, torch.Tensor]:
    """A loss through the whole model with a vector added after layer 0: its value and the
    vector's gradient; ``saved`` receives the shape of every tensor autograd keeps for backward."""
    model.requires_grad_(False)  # frozen, as the fit freezes it
    vector = torch.zeros(model.config.hidden_size, requires_grad=True)  # [hidden]
    layer = models.adapter_for(model).layers(model)[0]
    handle = layer.register_forward_hook(lambda _m, _a, out: (out[0] + vector, *out[1:]) if isinstance(out, tuple)
                                         else out + vector)

    def keep(t: torch.Tensor) -> torch.Tensor:
        if saved is not None:
            saved.append(tuple(t.shape))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits = model(input_ids=ids).logits  # [1, T, vocab]
            loss = logits.logsumexp(-1).mean() - logits[..., 3].mean()
        loss.backward()
    finally:
        handle.remove()
    return float(loss.detach()), vector.grad


def test_recomputed_layers_keep_no_weight_for_backward(digit_model_dir):
    """On a model whose weights are on disk, backward through :func:`models.recomputed_layers`
    gives the in-memory gradient while autograd keeps no tensor shaped like an MLP weight (it
    keeps the layers' inputs); without it autograd keeps them (what it would hold of a model
    larger than memory)."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 13).unsqueeze(0)  # [1, 10]
    whole = AutoModelForCausalLM.from_pretrained(digit_model_dir).eval()
    loss, grad = _loss_and_grad(whole, ids)
    offloaded, _tok = models.load(str(digit_model_dir), offload=True)
    assert models.is_offloaded(offloaded) and not models.is_offloaded(whole)
    mlp = {(whole.config.intermediate_size, whole.config.hidden_size),
           (whole.config.hidden_size, whole.config.intermediate_size)}
    plain: list[tuple[int, ...]] = []
    assert _loss_and_grad(offloaded, ids, plain)[0] == pytest.approx(loss, rel=1e-6)
    assert mlp & set(plain)  # the weights, held by the graph
    kept: list[tuple[int, ...]] = []
    with models.recomputed_layers(offloaded):
        got_loss, got_grad = _loss_and_grad(offloaded, ids, kept)
    assert got_loss == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(got_grad, grad, rtol=1e-5, atol=1e-6)
    assert not mlp & set(kept) and (1, 10, whole.config.hidden_size) in kept
    layer = models.adapter_for(offloaded).layers(offloaded)[0]
    assert "checkpointed" not in getattr(layer.forward, "__name__", "")  # the layers' own forward again


def _memory_and_disk(model_dir, tmp_path, kinds: str, *extra: str) -> tuple[dict, dict]:
    """The reports of one tiny edit run in memory and the same with ``--offload``."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 50} and {i}" for i in range(600)))
    reports = []
    for name, offload in (("memory", []), ("disk", ["--offload"])):
        out = tmp_path / name
        rc = cli.main(["-q", "edit", str(model_dir), "--target", "Gender=uniform", "--target",
                       "Age.digit1=uniform:2-6", "--method", kinds, "--units", "2", "--layers", "0-1", "--steps", "2",
                       "--fit-tables", "2", "--fit-rewordings", "1", "--measure-tables", "2", "--strength", "1",
                       "--eval-text", str(text), "--eval-tokens", "512", "--eval-seqlen", "16", "--out", str(out),
                       *extra, *offload])
        assert rc == 0
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


def test_cli_edit_with_offload_gives_the_in_memory_report(digit_model_dir, tmp_path):
    """Every kind, measured with the weights on disk, reads as in memory (the weight kinds applied
    by hooks there, added to the weights here: equal up to rounding)."""
    memory, disk = _memory_and_disk(digit_model_dir, tmp_path, "all")
    assert [r["kind"] for r in disk["results"]] == list(KINDS)
    assert all(abs(r["target_js_after"] - r["target_js_before"]) > 3e-4 for r in disk["results"])  # each one acts
    _assert_same_figures(memory, disk, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_cli_edit_with_offload_on_cuda_gives_the_in_memory_report(digit_model_dir, tmp_path):
    """The same on a CUDA device: the weights read from disk onto it, the edit's tensors there."""
    memory, disk = _memory_and_disk(digit_model_dir, tmp_path, "fit,gated,weight", "--device", "cuda")
    _assert_same_figures(memory, disk, rel=1e-3)
