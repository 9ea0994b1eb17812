"""Pruning with weights on disk (--offload): same result as in memory, one layer in memory at a
time, a checkpoint plain transformers loads, and clear refusals."""

import contextlib
import json
import logging
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunescope import cli, formats, offload
from prunescope.errors import PrunescopeError
from prunescope.pruning import job
from prunescope.pruning.job import PruneConfig, run_prune
from prunescope.testing import tiny_family_model, tiny_tokenizer

FAST = dict(calib_samples=4, calib_seqlen=32, eval_tokens=512, eval_seqlen=64, device="cpu")


def _save(model: torch.nn.Module, folder: Path, shard: str | None = "40KB") -> Path:
    """Save ``model`` (in shards of ``shard``, so the index is exercised) and a tokenizer."""
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _save(tiny_family_model("llama"), tmp_path_factory.mktemp("llama"))


def _config(folder: Path, text: str, **kw) -> PruneConfig:
    return PruneConfig(model=str(folder), calib_text=text, eval_text=text, **{**FAST, **kw})


def _sharded_state(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / offload.INDEX_FILE).read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(index.values())):
        state.update(load_file(str(folder / file)))
    assert set(state) == set(index)
    return state


@pytest.mark.parametrize("method, extra", [
    ("wanda", {}), ("sparsegpt", {}), ("magnitude", {"scope": "layer"}), ("wanda", {"pattern": "2:4"}),
])
def test_offloaded_prune_equals_the_in_memory_run(llama_dir, text_file, tmp_path, method, extra):
    memory, model = run_prune(_config(llama_dir, text_file, method=method, **extra))
    saved = tmp_path / "offloaded"
    offloaded, _ = run_prune(_config(llama_dir, text_file, method=method, offload=True, save_dir=saved, **extra))
    assert offloaded.offloaded and not memory.offloaded
    assert offloaded.dense_ppl == pytest.approx(memory.dense_ppl, rel=1e-6)
    assert offloaded.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)
    assert offloaded.pruned_ppl != pytest.approx(offloaded.dense_ppl, rel=1e-4)  # pruning did something
    assert (offloaded.pruned_parameters, offloaded.total_parameters) == (memory.pruned_parameters,
                                                                        memory.total_parameters)
    assert offloaded.layers == memory.layers
    state = _sharded_state(saved)
    want = model.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name


def test_the_saved_folder_loads_in_plain_transformers(llama_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = run_prune(_config(llama_dir, text_file, method="wanda", evaluate=False))
    run_prune(_config(llama_dir, text_file, method="wanda", evaluate=False, offload=True, save_dir=tmp_path / "m"))
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]  # 3 layers + the rest
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_one_decoder_layer_in_memory_at_a_time(llama_dir, text_file, monkeypatch):
    seen: list[tuple[int, int]] = []
    original = offload.OffloadedModel.layer

    def watched(self, index, write=False):
        context = original(self, index, write)

        class Watch:
            def __enter__(inner):
                layer = context.__enter__()
                real = sum(p.numel() for p in self.decoder.parameters() if not p.is_meta)
                embed = self.model.get_submodule(self.adapter.embed_path).weight
                seen.append((real, int(not embed.is_meta)))
                return layer

            def __exit__(inner, *exc):
                return context.__exit__(*exc)

        return Watch()

    monkeypatch.setattr(offload.OffloadedModel, "layer", watched)
    run_prune(_config(llama_dir, text_file, method="sparsegpt", offload=True))
    one_layer = sum(p.numel() for p in tiny_family_model("llama").model.layers[0].parameters())
    assert len(seen) == 3 + 3 + 3  # dense perplexity, pruning, pruned perplexity
    assert seen == [(one_layer, 0)] * len(seen)  # one layer, and the embeddings freed


@pytest.mark.parametrize("family, overrides", [
    ("qwen2", {}), ("phi3", {}), ("opt", {}), ("mistral", {}), ("llama", {"tie_word_embeddings": True}),
])
def test_offload_families_match_in_memory(family, overrides, text_file, tmp_path):
    folder = _save(tiny_family_model(family, **overrides), tmp_path / family, shard=None)
    memory, model = run_prune(_config(folder, text_file, method="wanda"))
    offloaded, _ = run_prune(_config(folder, text_file, method="wanda", offload=True, save_dir=tmp_path / "out"))
    assert offloaded.dense_ppl == pytest.approx(memory.dense_ppl, rel=1e-6)
    assert offloaded.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)
    state = _sharded_state(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(state[name], tensor), name
    tied = overrides.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in state) != tied


def test_bfloat16_checkpoint_is_pruned_and_written_in_bfloat16(text_file, tmp_path):
    folder = _save(tiny_family_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    memory, model = run_prune(_config(folder, text_file, method="wanda", evaluate=False))
    run_prune(_config(folder, text_file, method="wanda", evaluate=False, offload=True, save_dir=tmp_path / "out"))
    state = _sharded_state(tmp_path / "out")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_embeddings_are_mapped_in_their_stored_dtype_and_computed_in_the_run_dtype(text_file, tmp_path, monkeypatch):
    folder = _save(tiny_family_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    memory, model = run_prune(_config(folder, text_file, method="sparsegpt", dtype="float32"))
    seen = []
    original = offload.OffloadedModel.front

    @contextlib.contextmanager
    def watched(self):
        with original(self):
            embed = self.model.get_submodule(self.adapter.embed_path)
            seen.append((embed.weight.dtype, embed(torch.tensor([[1, 2]])).dtype))
            yield

    monkeypatch.setattr(offload.OffloadedModel, "front", watched)
    offloaded, _ = run_prune(_config(folder, text_file, method="sparsegpt", dtype="float32", offload=True,
                                     save_dir=tmp_path / "out"))
    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}  # mapped as stored, computed in float32
    assert offloaded.dense_ppl == pytest.approx(memory.dense_ppl, rel=1e-6)
    assert offloaded.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)
    state = _sharded_state(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_a_mapped_tensor_reads_the_file_and_writing_it_leaves_the_file_alone(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 6).to(torch.bfloat16)}
    path = tmp_path / offload.SINGLE_FILE
    save_file(tensors, str(path))
    files = offload.CheckpointFiles.scan(tmp_path)
    for key, tensor in tensors.items():
        mapped = files.mapped(key)
        assert mapped.dtype == tensor.dtype and torch.equal(mapped, tensor)
    files.mapped("b").zero_()  # copy-on-write
    assert torch.equal(load_file(str(path))["b"], tensors["b"])


def test_write_safetensors_streams_a_file_safetensors_reads(tmp_path):
    tensors = {
        "a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
        "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.randn(4, 2).T,  # not contiguous
    }
    specs = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    size = offload.write_safetensors(tmp_path / "x.safetensors", specs, tensors.__getitem__)
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with pytest.raises(ValueError, match="header says"):
        offload.write_safetensors(tmp_path / "y.safetensors", {"a": ((3, 4), torch.float32)}, tensors.__getitem__)


def test_automatic_offload_when_the_model_does_not_fit(llama_dir, text_file, monkeypatch, caplog):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10_000))
    with caplog.at_level(logging.WARNING):
        result, _ = run_prune(_config(llama_dir, text_file, method="wanda", evaluate=False))
    assert result.offloaded
    assert "offloading layer by layer" in caplog.text
    result, _ = run_prune(_config(llama_dir, text_file, method="wanda", evaluate=False, offload=False))
    assert not result.offloaded  # --no-offload wins


def test_an_interrupted_offloaded_run_leaves_nothing(llama_dir, text_file, tmp_path, monkeypatch):
    calls = []
    original = job._prune_step

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(job, "_prune_step", failing)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for save in (tmp_path / "saved", None):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_prune(_config(llama_dir, text_file, method="wanda", evaluate=False, offload=True,
                              save_dir=save, offload_folder=scratch))
        assert not (tmp_path / "saved").exists()
        assert list(scratch.iterdir()) == []
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".saved")] == []


@pytest.mark.parametrize("kw, message", [
    ({"method": "magnitude"}, "global magnitude compares all weights at once"),
    ({"method": "wanda", "sweep": (0.3,)}, "--sweep cannot be combined with --offload"),
])
def test_what_offload_cannot_do_is_refused_up_front(llama_dir, text_file, kw, message):
    with pytest.raises(PrunescopeError, match=message):
        _config(llama_dir, text_file, offload=True, **kw)


def test_checkpoints_offload_cannot_read_are_named(text_file, tmp_path, tiny_model):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tiny_model.config.save_pretrained(bin_dir)
    torch.save(tiny_model.state_dict(), bin_dir / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(bin_dir)
    with pytest.raises(PrunescopeError, match="--offload reads safetensors checkpoints"):
        run_prune(_config(bin_dir, text_file, method="wanda", offload=True))
    formats.save_sparse(tiny_model, tmp_path / "sparse", tokenizer=tiny_tokenizer())
    with pytest.raises(PrunescopeError, match="is a prunescope sparse checkpoint"):
        run_prune(_config(tmp_path / "sparse", text_file, method="wanda", offload=True))


def test_no_room_on_disk_is_reported_before_any_work(llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda _p: types.SimpleNamespace(free=1000))
    with pytest.raises(PrunescopeError, match=r"needs \d+\.\d kB in .* which has 1.0 kB free"):
        run_prune(_config(llama_dir, text_file, method="wanda", offload=True, save_dir=tmp_path / "m"))
    assert list(tmp_path.iterdir()) == []


def test_cli_offload_end_to_end_and_its_errors(llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["prune", str(llama_dir), "--method", "wanda", "--calib-text", text_file, "--eval-text", text_file,
              "--calib-samples", "2", "--calib-seqlen", "32", "--eval-tokens", "256", "--eval-seqlen", "64"]
    assert cli.main([*common, "--offload", "--save", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["offloaded"] is True and report["peak_rss_bytes"] > 0
    assert report["checkpoint"]["shards"] == 4
    assert "offloaded" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli.main([*common, "--offload", "--sweep", "0.3", "--out", str(tmp_path / "x")]) == 2
    assert cli.main([*common, "--offload-folder", str(out / "report.json"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "prunescope prune: error: --sweep cannot be combined with --offload (it restores the dense weights in memory)"
    assert err[1].startswith("prunescope prune: error: --offload-folder") and "is not a writable folder" in err[1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_prune_on_cuda_matches_in_memory_on_cuda(llama_dir, text_file, tmp_path, method):
    memory, model = run_prune(_config(llama_dir, text_file, method=method, device="cuda"))
    offloaded, _ = run_prune(_config(llama_dir, text_file, method=method, device="cuda", offload=True,
                                     save_dir=tmp_path / "m"))
    assert offloaded.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-5)
    state = _sharded_state(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name] != 0, tensor.cpu() != 0), name


def _assert_same_report(got: object, want: object, where: str = "report") -> None:
    """Equal reports up to float rounding, ignoring timings, paths and memory figures."""
    skip = ("seconds", "path", "rss", "offload", "time", "out")
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        keys = [k for k in want if not any(s in k for s in skip)]
        assert sorted(k for k in got if k in keys) == sorted(keys), where
        for k in keys:
            _assert_same_report(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_report(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    else:
        assert got == want, where


def test_activations_with_offload_give_the_in_memory_report(llama_dir, text_file, tmp_path):
    args = ["-q", "activations", str(llama_dir), "--text", text_file, "--tokens", "128", "--seqlen", "32",
            "--eps", "0.01,0.1", "--threshold", "0.5", "--calib-text", text_file, "--calib-tokens", "64",
            "--eval-text", text_file, "--eval-tokens", "128", "--eval-seqlen", "32", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "memory")]) == 0
    assert cli.main([*args, "--offload", "--out", str(tmp_path / "disk")]) == 0
    memory = json.loads((tmp_path / "memory" / "report.json").read_text())
    disk = json.loads((tmp_path / "disk" / "report.json").read_text())
    assert memory["threshold"]["points"][0]["ppl"] > 1
    _assert_same_report(disk, memory)


def test_load_with_offload_keeps_the_weights_on_disk(llama_dir):
    from prunescope import models

    model, _ = models.load(str(llama_dir), device="cpu", offload=True)
    reference, _ = models.load(str(llama_dir), device="cpu")
    assert all(p.is_meta for p in model.parameters())
    assert models.input_device(model) == torch.device("cpu")
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---------------------------------------------------------------------- shrink


def _shrink_config(folder: Path, text: str, **kw):
    from prunescope.pruning.shrink import ShrinkConfig

    base = dict(model=str(folder), calib_text=text, eval_text=text, multiple_of=8, latency_rounds=0,
                calib_batch_size=2, **FAST)
    return ShrinkConfig(**{**base, **kw})


@pytest.mark.parametrize("family, kw", [
    ("llama", dict(mlp=0.25, kv_groups=1, drop_layers=1)),
    ("llama", dict(mlp=0.5, heads_per_group=1, compensation="bias")),
    ("llama", dict(mlp=0.5, criterion="magnitude", compensation="none")),  # no calibration data
    ("llama", dict(drop_layers=2)),  # layers only: the kept layers are copied, renumbered
    ("opt", dict(mlp=0.5, drop_layers=1)),
])
def test_offloaded_shrink_equals_the_in_memory_run(family, kw, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunescope.pruning.shrink import run_shrink

    folder = _save(tiny_family_model(family), tmp_path / "dense")
    memory, model = run_shrink(_shrink_config(folder, text_file, save_dir=tmp_path / "memory", **kw))
    disk, _ = run_shrink(_shrink_config(folder, text_file, offload=True, save_dir=tmp_path / "disk", **kw))
    assert disk.offloaded and not memory.offloaded and disk.latency is None
    assert disk.dense_ppl == pytest.approx(memory.dense_ppl, rel=1e-6)
    assert disk.pruned_ppl == pytest.approx(memory.pruned_ppl, rel=1e-6)
    assert disk.pruned_ppl != pytest.approx(disk.dense_ppl, rel=1e-4)  # shrinking did something
    assert disk.layers == memory.layers and disk.config_changes == memory.config_changes
    for figure in ("dense_params", "shrunk_params", "dense_layer_params", "shrunk_layer_params",
                   "dense_weight_bytes", "shrunk_weight_bytes"):
        assert getattr(disk, figure) == getattr(memory, figure), figure
    state, want = _sharded_state(tmp_path / "disk"), model.state_dict()
    tied = set(want) - set(state)
    assert tied <= {"lm_head.weight"}  # a tied head is saved once, as the embedding
    for name in state:
        assert torch.equal(state[name], want[name]), name
    saved = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert saved == json.loads((tmp_path / "memory" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_offloaded_shrink_holds_one_decoder_layer_at_a_time(llama_dir, text_file, monkeypatch):
    from prunescope.pruning.shrink import run_shrink

    seen: list[tuple[int, int]] = []
    original = offload.OffloadedModel.layer

    def watched(self, index, write=False):
        with original(self, index, write) as layer:
            real = sum(p.numel() for p in self.decoder.parameters() if not p.is_meta)
            embed = self.model.get_submodule(self.adapter.embed_path).weight
            seen.append((real, int(not embed.is_meta)))
            yield layer

    monkeypatch.setattr(offload.OffloadedModel, "layer", contextlib.contextmanager(watched))
    run_shrink(_shrink_config(llama_dir, text_file, mlp=0.5, kv_groups=1, drop_layers=1, offload=True))
    dense = sum(p.numel() for p in tiny_family_model("llama").model.layers[0].parameters())
    assert len(seen) == 3 + 3 + 2 + 2  # dense perplexity, block influence, shrink, shrunk perplexity
    assert all(real == dense for real, _ in seen[:8])  # each dense layer visits alone (shrunk on exit)
    assert all(0 < real < dense for real, _ in seen[8:])  # the shrunk layers, read back from the sink
    assert not any(embed for _, embed in seen)


def test_cli_shrink_offload_end_to_end(llama_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    args = ["shrink", str(llama_dir), "--offload", "--mlp", "0.5", "--multiple-of", "8",
            "--calib-text", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
            "--eval-text", text_file, "--eval-tokens", "256", "--eval-seqlen", "32", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["offloaded"] and report["latency"] is None and report["peak_rss_bytes"] > 0
    assert "offloaded" in (tmp_path / "out" / "report.md").read_text()
    shrunk = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert shrunk.config.intermediate_size == report["shrunk_shape"]["intermediate"] < 64
    assert cli.main([*args, "--recover-steps", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "cannot be combined with --offload" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
