"""prunescope.lora: reading PEFT adapters, spectra without forming ΔW, statistics, comparisons,
re-compression that PEFT loads back. Adapters are built in the tests on tiny random models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prunescope.errors import PrunescopeError
from prunescope.lora.analysis import analyse_paths, paired_comparison
from prunescope.lora.compress import CompressConfig, compress_adapter
from prunescope.lora.io import find_adapters, load_adapter
from prunescope.lora.spectrum import (
    batched_singular_values,
    effective_rank,
    energy_rank,
    lowrank_singular_values,
    lowrank_svd,
    stable_rank,
)
from prunescope.testing import tiny_llama

PREFIX = "base_model.model.model.layers"


def _randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """PEFT starts lora_B (and embedding lora_A) at zero; give every factor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_adapter(folder: Path, seed: int = 0, **lora_kwargs):
    """A PEFT adapter on the tiny Llama with random factors; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]} | lora_kwargs
    model = get_peft_model(tiny_llama(), LoraConfig(**kwargs))
    _randomise_lora(model, seed)
    model.save_pretrained(folder)
    return model


def hand_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """Hand-written adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} | config
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _qa(out: int = 12, inp: int = 10, r: int = 4, layer: int = 0) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}.{layer}.self_attn.q_proj.lora_A.weight": torch.randn(r, inp),
            f"{PREFIX}.{layer}.self_attn.q_proj.lora_B.weight": torch.randn(out, r)}


# ---------------------------------------------------------------- spectra and statistics


@pytest.mark.parametrize(("out", "inp", "r", "scale"), [(48, 40, 8, 2.0), (64, 200, 16, 0.5), (6, 50, 12, 1.0), (300, 5, 8, 3.0)])
def test_lowrank_singular_values_match_dense_svd(out: int, inp: int, r: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(out + inp + r)
    B = torch.randn(out, r, generator=gen) * torch.logspace(0, -3, r)  # decaying columns
    A = torch.randn(r, inp, generator=gen)
    dense = torch.linalg.svdvals(scale * B.double() @ A.double())
    fast = lowrank_singular_values(B, A, scale)
    k = fast.numel()
    assert k == min(out, inp, r)
    keep = dense[:k] > 1e-6 * dense[0]
    rel = (fast[:k][keep] - dense[:k][keep]).abs() / dense[:k][keep]
    assert float(rel.max()) < 1e-5
    assert float(torch.cat([dense[k:], dense.new_zeros(1)]).max()) < 1e-9 * float(dense[0])  # the rest is numerically zero


def test_batched_singular_values_match_dense_svd_in_input_order() -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = [(48, 40, 8), (20, 40, 8), (48, 40, 8), (6, 50, 12), (48, 40, 8), (48, 40, 8)]
    factors = [(torch.randn(o, r, generator=gen), torch.randn(r, i, generator=gen), 0.5 + k)
               for k, (o, i, r) in enumerate(shapes)]
    # wide spectra (down to 1e-6 of the largest) and a rank-deficient block take the QR fallback
    factors[2] = (factors[2][0] * torch.logspace(0, -6, 8), factors[2][1], -1.5)
    factors[4] = (factors[4][0] * torch.tensor([1.0] * 7 + [0.0]), factors[4][1], 2.0)
    got = batched_singular_values(factors)
    assert len(got) == len(factors)
    for (B, A, scale), sigma in zip(factors, got):
        dense = torch.linalg.svdvals(scale * B.double() @ A.double())[: sigma.numel()]
        keep = dense > 1e-6 * dense[0]
        assert float(((sigma[keep] - dense[keep]).abs() / dense[keep]).max()) < 1e-5
        assert float(torch.cat([sigma[~keep], sigma.new_zeros(1)]).max()) < 1e-5 * float(dense[0])


def test_lowrank_svd_reconstructs_the_product() -> None:
    B, A = torch.randn(30, 6), torch.randn(6, 20)
    U, S, Vh = lowrank_svd(B, A, 1.5)
    assert torch.allclose(U @ torch.diag(S) @ Vh, 1.5 * B.double() @ A.double(), atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_rank_statistics_on_known_spectra() -> None:
    flat = torch.ones(5, dtype=torch.float64)
    assert effective_rank(flat) == pytest.approx(5.0)
    assert stable_rank(flat) == pytest.approx(5.0)
    spike = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert effective_rank(spike) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, dtype=torch.float64)) == 0.0
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # energies 9, 4, 1 of 14
    assert stable_rank(s) == pytest.approx(14 / 9)
    assert [energy_rank(s, t) for t in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())))
    with pytest.raises(PrunescopeError):
        energy_rank(s, 1.5)


# ---------------------------------------------------------------- reading adapters


def _peft_delta(model, name: str) -> torch.Tensor:
    """PEFT's own ΔW of module ``name`` (the ground truth of the conventions)."""
    return model.base_model.model.get_submodule(name).get_delta_weight("default").double()


@pytest.mark.parametrize("kwargs", [
    {},
    {"use_rslora": True, "lora_alpha": 12},
    {"rank_pattern": {"v_proj": 3, "layers.1.self_attn.q_proj": 5}, "alpha_pattern": {"k_proj": 7}},
    {"target_modules": ["q_proj", "embed_tokens", "down_proj"], "r": 4},
])
def test_blocks_reproduce_peft_delta_weight(tmp_path: Path, kwargs: dict) -> None:
    model = peft_adapter(tmp_path, **kwargs)
    adapter = load_adapter(tmp_path)
    from peft.tuners.lora import LoraLayer

    assert len(adapter.blocks) == sum(isinstance(m, LoraLayer) for m in model.modules())
    for block in adapter.blocks:
        delta = block.scale * block.B.double() @ block.A.double()
        if block.kind == "embedding":
            delta = delta.T
        assert torch.allclose(delta, _peft_delta(model, block.name), atol=1e-6), block.name
    ranks = {b.name: b.rank for b in adapter.blocks}
    if "rank_pattern" in kwargs:
        assert ranks["model.layers.0.self_attn.v_proj"] == 3
        assert ranks["model.layers.1.self_attn.q_proj"] == 5
        assert ranks["model.layers.0.self_attn.q_proj"] == 8


def test_conv_lora_is_flattened(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 1))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    _randomise_lora(model)
    model.save_pretrained(tmp_path)
    (block,) = load_adapter(tmp_path).blocks
    assert block.kind == "conv" and block.shape == (6, 27) and block.a_shape == (2, 3, 3, 3)
    peft_delta = model.base_model.model.get_submodule("0").get_delta_weight("default")  # [6, 3, 3, 3]
    assert torch.allclose(block.scale * block.B @ block.A, peft_delta.reshape(6, -1), atol=1e-6)


def test_fan_in_fan_out_and_bin_weights(tmp_path: Path) -> None:
    tensors = _qa()
    hand_adapter(tmp_path / "a", tensors, fan_in_fan_out=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save(tensors, tmp_path / "b" / "adapter_model.bin")
    sa = analyse_paths([tmp_path]).modules  # folder of adapter folders
    assert [m.adapter for m in sa] == ["a", "b"]
    assert sa[0].singular_values == pytest.approx(sa[1].singular_values)
    assert sa[0].scale == 2.0


def test_dora_and_pissa_are_flagged(tmp_path: Path) -> None:
    t = _qa() | {f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(12)}
    dora = load_adapter(hand_adapter(tmp_path / "d", t, use_dora=True))
    assert any("DoRA" in n and "base model" in n for n in dora.notes)
    pissa = load_adapter(hand_adapter(tmp_path / "p", _qa(), init_lora_weights="pissa"))
    assert any("base model" in n for n in pissa.notes)
    with pytest.raises(PrunescopeError, match="DoRA"):
        compress_adapter(dora, CompressConfig(), tmp_path / "out")


@pytest.mark.parametrize(("tensors", "config", "pattern"), [
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 10)}, {}, r"q_proj.lora_A.weight.*no matching lora_B"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 4)}, {}, r"lora_B.weight.*no matching lora_A"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 10),
      f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 3)}, {}, "do not multiply"),
    (_qa(), {"r": 0}, "'r' must be a positive integer"),
    (_qa(), {"r": 6}, "has rank 4 but adapter_config.json gives r=6"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.full((4, 10), float("nan")),
      f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 4)}, {}, r"q_proj.lora_A.weight.*NaN or inf"),
    ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 10),
      f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.tensor([[float("inf")] * 4] * 12)}, {}, "NaN or inf"),
    ({"something.else": torch.randn(3)}, {}, "holds no LoRA factors"),
])
def test_bad_adapters_name_file_and_key(tmp_path: Path, tensors, config, pattern: str) -> None:
    folder = hand_adapter(tmp_path / "bad", tensors, **config)
    with pytest.raises(PrunescopeError, match=pattern) as info:
        load_adapter(folder)
    assert str(folder) in str(info.value)


def test_bad_folders_and_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunescopeError, match="not a PEFT adapter"):
        load_adapter(tmp_path / "empty")
    with pytest.raises(PrunescopeError, match="does not exist"):
        load_adapter(tmp_path / "missing")
    folder = hand_adapter(tmp_path / "corrupt", _qa())
    (folder / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PrunescopeError, match="cannot read adapter weights .*adapter_model.safetensors"):
        load_adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PrunescopeError, match="no weights"):
        load_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(PrunescopeError, match="adapter_config.json"):
        load_adapter(folder)


def test_one_bad_adapter_does_not_stop_the_others(tmp_path: Path) -> None:
    good = hand_adapter(tmp_path / "good", _qa(layer=0) | _qa(layer=1))
    bad = hand_adapter(tmp_path / "bad", {f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 10)})
    report = analyse_paths([good, bad])
    assert [a.name for a in report.adapters] == ["good"]
    assert len(report.modules) == 2 and report.failures[0].path == str(bad)
    with pytest.raises(PrunescopeError, match="no adapter could be analysed"):
        analyse_paths([bad])
    assert find_adapters([tmp_path]) == [bad, good]


# ---------------------------------------------------------------- summaries and comparisons


def test_paired_comparison_direction_and_test() -> None:
    pairs = [(1.0 + i, 3.0 + i * 1.1) for i in range(12)]  # a lower everywhere
    c = paired_comparison(pairs, "v_proj", "q_proj")
    assert c.median_difference < 0 and c.a_lower == 12 and c.b_lower == 0
    assert c.p_value is not None and c.p_value < 0.001
    assert "v_proj has a lower effective rank than q_proj" in c.sentence and "12 of 12 layers" in c.sentence
    tie = paired_comparison([(1.0, 1.0), (2.0, 2.0)], "a", "b")
    assert tie.p_value is None and "same median effective rank" in tie.sentence


def test_analysis_per_type_and_layer(tmp_path: Path) -> None:
    """v_proj built with rank-1 structure must come out sharper than q_proj and k_proj."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(num_layers=4), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    _randomise_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "v_proj.lora_B" in name:  # one strong direction plus a little noise
                p.copy_(torch.outer(torch.randn(p.shape[0]), torch.ones(p.shape[1])) + 0.01 * torch.randn(p.shape))
    model.save_pretrained(tmp_path)
    report = analyse_paths([tmp_path])
    assert {t.module_type: t.count for t in report.type_summaries} == {"k_proj": 4, "q_proj": 4, "v_proj": 4}
    assert [s.layer for s in report.layer_summaries] == [0, 1, 2, 3]
    v_q = next(c for c in report.comparisons if (c.type_a, c.type_b) == ("v_proj", "q_proj"))
    assert v_q.a_lower == 4 and v_q.median_difference < -2
    v = [m for m in report.modules if m.module_type == "v_proj"]
    assert all(m.energy_rank_90 == 1 and m.top1_energy > 0.9 for m in v)


# ---------------------------------------------------------------- re-compression


def test_compressed_adapter_loads_in_peft_and_matches_truncation(tmp_path: Path) -> None:
    from peft import PeftModel

    peft_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], use_rslora=True)
    adapter = load_adapter(tmp_path / "a")
    result = compress_adapter(adapter, CompressConfig(energy=0.8, max_rank=6), tmp_path / "c")
    assert all(m.kept_energy >= 0.8 - 1e-9 or m.new_rank == 6 for m in result.modules)
    assert all(1 <= m.new_rank <= 6 for m in result.modules)
    assert result.new_parameters < result.old_parameters and 0 < result.parameter_saving < 1
    for m in result.modules:
        assert m.relative_frobenius_error == pytest.approx(math.sqrt(1 - m.kept_energy), abs=1e-9)
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {m.name: m.new_rank for m in result.modules}
    new = {b.name: b for b in load_adapter(tmp_path / "c").blocks}
    # expected model: base weights + truncated ΔW computed here by a dense SVD
    expected = tiny_llama()
    with torch.no_grad():
        for block in adapter.blocks:
            assert new[block.name].scale == pytest.approx(block.scale)
            U, S, Vh = torch.linalg.svd(block.scale * block.B.double() @ block.A.double(), full_matrices=False)
            k = new[block.name].rank
            expected.get_submodule(block.name).weight += (U[:, :k] * S[:k] @ Vh[:k]).float()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "c").eval()
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
        full = tiny_llama()
        for block in adapter.blocks:
            full.get_submodule(block.name).weight += (block.scale * block.B @ block.A)
        untruncated = full(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, untruncated, atol=1e-3)  # truncation did change the model


def test_compress_config_validation() -> None:
    for kwargs in ({"energy": 0.0}, {"energy": 1.2}, {"min_rank": 0}, {"max_rank": 1, "min_rank": 2}):
        with pytest.raises(PrunescopeError):
            CompressConfig(**kwargs)


def test_compress_embedding_and_conv_keep_peft_layout(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Embedding(20, 8))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "1"]))
    _randomise_lora(model)
    model.save_pretrained(tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    compress_adapter(adapter, CompressConfig(energy=0.6), tmp_path / "c")
    new = {b.name: b for b in load_adapter(tmp_path / "c").blocks}
    for block in adapter.blocks:
        nb = new[block.name]
        assert nb.kind == block.kind and nb.a_shape[1:] == block.a_shape[1:] and nb.b_shape[2:] == block.b_shape[2:]
        sigma = lowrank_singular_values(block.B, block.A, block.scale)
        got = lowrank_singular_values(nb.B, nb.A, nb.scale)
        assert torch.allclose(got, sigma[: nb.rank], rtol=1e-5)


def test_an_interrupted_compression_leaves_no_adapter(tmp_path, monkeypatch):
    import safetensors.torch

    adapter = load_adapter(hand_adapter(tmp_path / "a", _qa()))
    real = safetensors.torch.save_file

    def interrupted(tensors, path, **kw):
        real(tensors, path, **kw)  # the weights are written, then Ctrl-C before the config
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_adapter(adapter, CompressConfig(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no out folder, no temporary
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    compress_adapter(adapter, CompressConfig(), tmp_path / "out")
    assert load_adapter(tmp_path / "out").blocks[0].rank >= 1
