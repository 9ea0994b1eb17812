"""prunescope.formats: bitmask sparse checkpoints -- exact round trips, sizes, atomic writes, errors."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save, save_file

from prunescope import formats
from prunescope.errors import PrunescopeError
from prunescope.pruning.masks import nm_keep_mask
from prunescope.testing import tiny_llama

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((), (1,), (7,), (13, 17), (3, 5, 7), (0, 4), (2, 1, 3, 9))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as integers, so NaN and -0.0 compare exactly."""
    return t.contiguous().view(formats._BITS_VIEW[t.dtype])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(bits(a), bits(b)), name


def sparse_tensor(shape: tuple[int, ...], dtype: torch.dtype, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    return t * (torch.rand(shape, generator=g) < density).to(dtype)


def half_mask(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A keep-mask with exactly half the entries kept."""
    n = math.prod(shape)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[perm[: n // 2]] = True
    return keep.view(shape)


def file_entries(folder: Path) -> set[str]:
    with safe_open(str(folder / formats.WEIGHTS_FILE), framework="pt") as f:
        return set(f.keys())


# --------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1001])
def test_pack_unpack_round_trip_and_little_endian_bit_order(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = formats.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(formats.unpack_bits(packed, n), mask)
    expected = np.packbits(mask.numpy().astype(np.uint8), bitorder="little")
    assert packed.numpy().tobytes() == expected.tobytes()


def test_bit_order_is_least_significant_bit_first() -> None:
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[1, 7] = True  # entries 0, 9 and 15
    assert formats.pack_bits(mask).tolist() == [1, 2 + 128]


def test_keep_mask_keeps_nan_and_drops_both_zeros() -> None:
    t = torch.tensor([0.0, -0.0, float("nan"), 1e-45, float("-inf"), 2.0])
    assert formats.keep_mask(t).tolist() == [False, False, True, True, True, True]
    assert formats.negative_zeros(t).tolist() == [False, True, False, False, False, False]
    assert not formats.negative_zeros(torch.tensor([0, -1, 2])).any()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", FLOATS)
def test_round_trip_is_bit_exact_for_odd_shapes_and_densities(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {
        f"t{i}.d{int(100 * d)}": sparse_tensor(shape, dtype, d, seed=i)
        for i, shape in enumerate(SHAPES)
        for d in (0.0, 0.3, 0.5, 1.0)
    }
    info = formats.save_sparse(state, tmp_path / "ck")
    out = formats.load_sparse(tmp_path / "ck")
    assert list(out) == list(state)
    for name, t in state.items():
        assert_bit_equal(t, out[name], name)
        assert torch.equal(t, out[name])
    layouts = {s.layout for s in info.tensors}
    assert layouts == {"bitmask", "dense"}


def test_special_values_survive_and_negative_zero_is_kept(tmp_path: Path) -> None:
    t = torch.zeros(4, 16)
    t[0, :5] = torch.tensor([-0.0, float("nan"), float("inf"), float("-inf"), 1e-40])  # 1e-40: subnormal
    t[1, 3] = -0.0
    for dtype in FLOATS:
        state = {"w": t.to(dtype)}
        info = formats.save_sparse(state, tmp_path / str(dtype))
        (stats,) = info.tensors
        assert stats.layout == "bitmask"
        kept = 3 + int(t[0, 4].to(dtype).item() != 0)  # the subnormal underflows in float16
        assert stats.density == pytest.approx(kept / 64)
        assert formats.SIGNS_SUFFIX in "".join(file_entries(tmp_path / str(dtype)))
        out = formats.load_sparse(tmp_path / str(dtype))["w"]
        assert_bit_equal(state["w"], out)
        assert torch.signbit(out[1, 3]) and torch.signbit(out[0, 0])
        assert not torch.signbit(out[2, 0])


def test_integer_and_bool_tensors_round_trip(tmp_path: Path) -> None:
    state = {
        "i64": torch.tensor([0, -3, 0, 0, 0, 0, 0, 2**40]),
        "i8": torch.zeros(33, dtype=torch.int8).index_fill_(0, torch.tensor([3, 30]), -1),
        "flags": torch.arange(40) % 5 == 0,
        "u8": torch.arange(10, dtype=torch.uint8),
    }
    formats.save_sparse(state, tmp_path / "ck")
    out = formats.load_sparse(tmp_path / "ck")
    for name, t in state.items():
        assert_bit_equal(t, out[name], name)


def test_all_zero_and_all_nonzero_tensors(tmp_path: Path) -> None:
    state = {"zeros": torch.zeros(5, 9), "full": torch.randn(5, 9).abs() + 1, "scalar0": torch.tensor(0.0)}
    info = formats.save_sparse(state, tmp_path / "ck")
    by_name = {s.name: s for s in info.tensors}
    assert by_name["zeros"].layout == "bitmask" and by_name["zeros"].stored_bytes == 6  # ceil(45/8)
    assert by_name["full"].layout == "dense" and by_name["full"].density == 1.0
    assert by_name["scalar0"].layout == "bitmask"  # 1 mask byte < 4 bytes
    assert file_entries(tmp_path / "ck") == {
        "zeros.__values", "zeros.__bitmask", "full", "scalar0.__values", "scalar0.__bitmask"
    }
    out = formats.load_sparse(tmp_path / "ck")
    for name, t in state.items():
        assert_bit_equal(t, out[name], name)


@pytest.mark.parametrize("density", [0.5, 0.9, 0.96, 0.97, 0.99])
def test_layout_is_the_smaller_of_bitmask_and_dense(tmp_path: Path, density: float) -> None:
    t = torch.randn(40, 100).abs() + 1
    n_zero = round((1 - density) * t.numel())
    t.view(-1)[:n_zero] = 0
    (stats,) = formats.save_sparse({"w": t}, tmp_path / "ck").tensors
    bitmask = formats.bitmask_bytes(t.numel(), t.numel() - n_zero, 4)
    assert stats.layout == ("bitmask" if bitmask < stats.dense_bytes else "dense")
    assert stats.stored_bytes == min(bitmask, stats.dense_bytes)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_half_sparse_tensor_takes_at_most_054_of_dense(tmp_path: Path, pattern: str, dtype: torch.dtype) -> None:
    w = torch.randn(96, 64).to(dtype)
    keep = half_mask(tuple(w.shape)) if pattern == "50%" else nm_keep_mask(w.abs(), 2, 4)
    w = w.masked_fill(~keep, 0.0)  # +0.0 zeros, as apply.apply_masks writes them
    (stats,) = formats.save_sparse({"w": w}, tmp_path / "ck").tensors
    assert stats.layout == "bitmask" and stats.density == 0.5
    bound = 0.5 + 1 / (8 * w.element_size())  # half the values plus the bitmask
    assert stats.stored_bytes / stats.dense_bytes == pytest.approx(bound)
    if dtype == torch.float32:
        assert stats.stored_bytes <= 0.54 * stats.dense_bytes


@pytest.mark.parametrize("dtype", FLOATS)
def test_mask_multiplied_negative_zeros_cost_one_bit_each(tmp_path: Path, dtype: torch.dtype) -> None:
    w = torch.randn(96, 64).to(dtype)
    w = w * half_mask(tuple(w.shape))  # torch.nn.utils.prune style: negative weights become -0.0
    n_neg = int(formats.negative_zeros(w).sum())
    assert 0 < n_neg < w.numel() // 2
    (stats,) = formats.save_sparse({"w": w}, tmp_path / "ck").tensors
    assert stats.layout == "bitmask" and stats.density == 0.5
    size = w.numel() // 2 * w.element_size() + w.numel() // 8 + w.numel() // 16
    assert stats.stored_bytes == size  # float32: 0.546875 of dense
    out = formats.load_sparse(tmp_path / "ck")["w"]
    assert_bit_equal(w, out)
    assert int(formats.negative_zeros(out).sum()) == n_neg


def test_data_section_is_the_sum_of_stored_bytes(tmp_path: Path) -> None:
    state = {f"w{i}": sparse_tensor((31, 29), torch.float32, d, i) for i, d in enumerate((0.1, 0.5, 1.0))}
    info = formats.save_sparse(state, tmp_path / "ck")
    raw = (tmp_path / "ck" / formats.WEIGHTS_FILE).read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) == info.file_bytes
    assert len(raw) - 8 - header_len == sum(s.stored_bytes for s in info.tensors)


def test_dense_size_formula_matches_safetensors_byte_for_byte() -> None:
    state = {
        "b": torch.zeros(3, dtype=torch.float16), "a": torch.zeros(2, 2), "c": torch.zeros(1, dtype=torch.bfloat16),
        "d": torch.zeros(1, dtype=torch.int64), "e": torch.zeros(5, dtype=torch.uint8), "f": torch.zeros(0),
        "g": torch.zeros(3, dtype=torch.bool), "h": torch.zeros((), dtype=torch.float64),
        "i": torch.zeros(2, dtype=torch.int32), "j": torch.zeros(2, dtype=torch.int16),
        "k": torch.zeros(7, dtype=torch.int8), "model.layers.10.weight": torch.zeros(17, 3),
    }
    for meta in (None, {"format": "pt"}):
        assert formats.dense_safetensors_bytes(state, meta) == len(save(state, metadata=meta))
    tiny = tiny_llama().state_dict()
    assert formats.dense_safetensors_bytes(tiny, {"format": "pt"}) == len(save(tiny, metadata={"format": "pt"}))


def test_dense_file_bytes_equals_save_pretrained_file(tmp_path: Path, tiny_model) -> None:
    tiny_model.save_pretrained(tmp_path / "dense")
    info = formats.save_sparse(tiny_model, tmp_path / "ck")
    assert info.dense_file_bytes == (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert info.size_ratio == info.file_bytes / info.dense_file_bytes


# --------------------------------------------------------------------------- models


def _prune_half(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for i, module in enumerate(model.model.layers.modules()):
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(half_mask(tuple(module.weight.shape), seed=i))


def test_model_round_trip_gives_identical_logits_and_tokenizer(tmp_path: Path, tiny_tokenizer_) -> None:
    model = tiny_llama(vocab_size=max(384, len(tiny_tokenizer_)))
    _prune_half(model)
    info = formats.save_sparse(model, tmp_path / "ck", tokenizer=tiny_tokenizer_)
    assert info.config_saved and info.tokenizer_saved
    assert info.sparse_tensors == 2 * 7 and info.size_ratio < 1
    assert (tmp_path / "ck" / "config.json").is_file()
    rebuilt, tok = formats.load_sparse_model(tmp_path / "ck")
    assert tok is not None and tok("the quick fox").input_ids == tiny_tokenizer_("the quick fox").input_ids
    for name, t in model.state_dict().items():
        assert_bit_equal(t, rebuilt.state_dict()[name], name)
    ids = torch.tensor([[1, 5, 9, 42, 7, 300]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, rebuilt(ids).logits)
    assert not rebuilt.training


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    info = formats.save_sparse(model, tmp_path / "ck")
    by_name = {s.name: s for s in info.tensors}
    assert by_name["lm_head.weight"].layout == "alias"
    assert by_name["lm_head.weight"].alias_of == "model.embed_tokens.weight"
    entries = file_entries(tmp_path / "ck")
    assert "model.embed_tokens.weight" in entries and not any(e.startswith("lm_head") for e in entries)
    state = formats.load_sparse(tmp_path / "ck")
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    rebuilt, tok = formats.load_sparse_model(tmp_path / "ck")
    assert tok is None
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, rebuilt(ids).logits)


def test_read_info_returns_what_save_returned(tmp_path: Path, tiny_model) -> None:
    info = formats.save_sparse(tiny_model, tmp_path / "ck")
    assert formats.read_info(tmp_path / "ck") == info
    text = formats.info_markdown(info)
    assert "| dense |" in text and f"{info.file_bytes:,}" in text


# --------------------------------------------------------------------------- atomic writes


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where", ["_write_index", "_write_extras", "save_file"])
def test_interrupted_save_leaves_no_checkpoint(tmp_path: Path, tiny_model, monkeypatch, where: str) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated interrupt")

    if where == "save_file":
        monkeypatch.setattr("safetensors.torch.save_file", boom)
    else:
        monkeypatch.setattr(formats, where, boom)
    with pytest.raises(KeyboardInterrupt):
        formats.save_sparse(tiny_model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(PrunescopeError, match="does not exist"):
        formats.load_sparse(tmp_path / "ck")


def test_interrupted_overwrite_keeps_the_previous_checkpoint(tmp_path: Path, tiny_model, monkeypatch) -> None:
    old = {"w": torch.arange(12.0).view(3, 4)}
    formats.save_sparse(old, tmp_path / "ck")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(formats, "_write_index", boom)
    with pytest.raises(OSError, match="simulated"):
        formats.save_sparse(tiny_model, tmp_path / "ck")
    assert _leftovers(tmp_path) == []
    assert torch.equal(formats.load_sparse(tmp_path / "ck")["w"], old["w"])
    monkeypatch.undo()
    formats.save_sparse(tiny_model, tmp_path / "ck")  # a complete overwrite replaces it
    assert set(formats.load_sparse(tmp_path / "ck")) == set(tiny_model.state_dict())
    assert _leftovers(tmp_path) == []


def test_folder_without_index_never_loads(tmp_path: Path) -> None:
    formats.save_sparse({"w": torch.ones(3)}, tmp_path / "ck")
    (tmp_path / "ck" / formats.INDEX_FILE).unlink()  # as a killed save would leave its temp folder
    with pytest.raises(PrunescopeError, match=formats.INDEX_FILE):
        formats.load_sparse(tmp_path / "ck")


def test_refuses_to_replace_a_foreign_folder_or_file(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PrunescopeError, match="not a prunescope sparse checkpoint"):
        formats.save_sparse({"w": torch.ones(2)}, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrunescopeError, match="not a folder"):
        formats.save_sparse({"w": torch.ones(2)}, tmp_path / "file")
    formats.save_sparse({"w": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(PrunescopeError, match="overwrite"):
        formats.save_sparse({"w": torch.ones(2)}, tmp_path / "ck", overwrite=False)


# --------------------------------------------------------------------------- errors


def _rewrite(folder: Path, edit) -> None:
    """Re-save the weights file after ``edit(tensors, metadata)`` and fix the index's size."""
    path = folder / formats.WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    index = json.loads((folder / formats.INDEX_FILE).read_text())
    index["weights_bytes"] = path.stat().st_size
    (folder / formats.INDEX_FILE).write_text(json.dumps(index))


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    state = {"a.weight": sparse_tensor((8, 16), torch.float32, 0.5, 1), "b.weight": torch.ones(4, 4)}
    formats.save_sparse(state, tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrunescopeError, match="nowhere.*does not exist"):
        formats.load_sparse(tmp_path / "nowhere")


def test_unknown_index_version_is_rejected(checkpoint: Path) -> None:
    index = json.loads((checkpoint / formats.INDEX_FILE).read_text())
    index["format_version"] = 99
    (checkpoint / formats.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(PrunescopeError, match="unknown format version 99"):
        formats.load_sparse(checkpoint)


def test_unknown_tensor_version_names_file_and_tensor(checkpoint: Path) -> None:
    def edit(tensors, metadata):
        meta = json.loads(metadata["tensor:a.weight"])
        metadata["tensor:a.weight"] = json.dumps({**meta, "v": 7})

    _rewrite(checkpoint, edit)
    with pytest.raises(PrunescopeError, match=r"sparse_model\.safetensors.*'a\.weight'.*version 7"):
        formats.load_sparse(checkpoint)


@pytest.mark.parametrize("tensor", ["a.weight", "b.weight"])
def test_mismatched_shape_names_file_and_tensor(checkpoint: Path, tensor: str) -> None:
    def edit(tensors, metadata):
        meta = json.loads(metadata[f"tensor:{tensor}"])
        metadata[f"tensor:{tensor}"] = json.dumps({**meta, "shape": [4, 16]})

    _rewrite(checkpoint, edit)
    with pytest.raises(PrunescopeError, match=rf"sparse_model\.safetensors, tensor '{tensor}'.*shape"):
        formats.load_sparse(checkpoint)


def test_values_not_matching_the_bitmask_are_rejected(checkpoint: Path) -> None:
    _rewrite(checkpoint, lambda tensors, metadata: tensors.update({"a.weight.__values": torch.ones(3)}))
    with pytest.raises(PrunescopeError, match=r"'a\.weight'.*bitmask keeps"):
        formats.load_sparse(checkpoint)


def test_truncated_or_corrupt_file_is_rejected(checkpoint: Path) -> None:
    path = checkpoint / formats.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(PrunescopeError, match="truncated"):
        formats.load_sparse(checkpoint)
    path.write_bytes(b"\xff" * len(data))  # right size, garbage content
    with pytest.raises(PrunescopeError, match="not a readable safetensors file"):
        formats.load_sparse(checkpoint)


def test_bad_inputs_to_save_are_named(tmp_path: Path) -> None:
    with pytest.raises(PrunescopeError, match="'x' is a list"):
        formats.save_sparse({"x": [1, 2]}, tmp_path / "ck")
    with pytest.raises(PrunescopeError, match="reserves"):
        formats.save_sparse({"w.__values": torch.ones(2)}, tmp_path / "ck")
    with pytest.raises(PrunescopeError, match="torch.nn.Module or a mapping"):
        formats.save_sparse(42, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_state_dict_checkpoint_cannot_rebuild_a_model(checkpoint: Path) -> None:
    with pytest.raises(PrunescopeError, match="no config.json"):
        formats.load_sparse_model(checkpoint)


# --------------------------------------------------------------------------- the bundled model


@pytest.mark.integration
def test_bundled_model_half_sparse_checkpoint(tmp_path: Path, bundled) -> None:
    model, _ = bundled
    state = {}
    for i, (name, module) in enumerate(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            keep = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(i)) < 0.5
            state[f"model.layers.{name}.weight"] = module.weight.detach().masked_fill(~keep, 0.0)
    full = {k: v for k, v in model.state_dict().items()}
    full.update(state)  # embeddings, norms and the tied lm_head stay dense
    info = formats.save_sparse(full, tmp_path / "ck")
    by_name = {s.name: s for s in info.tensors}
    assert len(state) == 210 and all(by_name[k].layout == "bitmask" for k in state)
    assert all(by_name[k].stored_bytes <= 0.54 * by_name[k].dense_bytes for k in state)
    assert by_name["model.embed_tokens.weight"].layout == "dense"
    assert by_name["lm_head.weight"].layout == "alias"
    # 106M of 135M parameters are pruned Linear weights: the file shrinks to about 0.6x.
    assert 0.55 < info.size_ratio < 0.66
    out = formats.load_sparse(tmp_path / "ck")
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        assert_bit_equal(full[name], out[name], name)
    assert all(torch.equal(full[k], out[k]) for k in state)


# --------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    zero_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_bit_patterns_round_trip_exactly(dtype, shape, zero_share, seed) -> None:
    """Arbitrary bits (NaN payloads, infinities, subnormals, both zeros) survive save + load."""
    g = torch.Generator().manual_seed(seed)
    view = formats._BITS_VIEW[dtype]
    raw = torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int32)
    if view == torch.int32:
        raw = raw * 65536 + torch.randint(0, 2**16, shape, generator=g, dtype=torch.int32)
    t = raw.to(view).view(dtype)
    zeros = torch.rand(shape, generator=g) < zero_share
    t = torch.where(zeros, torch.where(torch.rand(shape, generator=g) < 0.5, 0.0, -0.0).to(dtype), t)
    with tempfile.TemporaryDirectory() as tmp:
        formats.save_sparse({"t": t}, Path(tmp) / "ck")
        assert_bit_equal(t, formats.load_sparse(Path(tmp) / "ck")["t"])
