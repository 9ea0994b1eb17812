"""--device / --dtype: resolution and checks, loading in a dtype, half-precision pruning and
shrinking on tiny models, float64 perplexity, and the meta device where only shapes matter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from prunescope import devices, evaluate, models
from prunescope.errors import PrunescopeError
from prunescope.pruning import job as pipeline
from prunescope.pruning.patterns import SparsityPattern
from prunescope.pruning.shrink import ShrinkConfig, make_plan, shrink_model
from prunescope.testing import tiny_family_model, tiny_llama

BLOCKS = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture()
def one_gpu(monkeypatch):
    """Pretend torch sees one CUDA device (only resolution is tested; nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_device_is_the_cpu_without_an_accelerator(no_accelerator):
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_auto_device_prefers_cuda(one_gpu):
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tpu", "unknown device 'tpu'; choose one of auto, cpu, cuda, cuda:N, mps"),
        ("gpu0", "unknown device 'gpu0'"),
        ("cuda", "device 'cuda' is not present on this machine"),
        ("cuda:1", "device 'cuda:1' is not present"),
        ("mps", "device 'mps' is not present"),
    ],
)
def test_bad_or_absent_devices_are_named(no_accelerator, spec, message):
    with pytest.raises(PrunescopeError, match=message.replace("(", r"\(")):
        devices.resolve_device(spec)


def test_a_cuda_index_beyond_the_machine_names_the_valid_ones(one_gpu):
    with pytest.raises(PrunescopeError, match="has 1 CUDA device.*cuda:0 to cuda:0"):
        devices.resolve_device("cuda:2")


@pytest.mark.parametrize(
    "spec, saved, want",
    [
        ("auto", None, torch.float32),
        ("auto", torch.float32, torch.float32),
        ("auto", torch.bfloat16, torch.bfloat16),
        ("auto", torch.float16, torch.float32),  # the CPU computes float16 checkpoints in float32
        ("auto", torch.float64, torch.float32),
        ("bfloat16", torch.float32, torch.bfloat16),
        ("float16", None, torch.float16),
        (torch.bfloat16, None, torch.bfloat16),
    ],
)
def test_dtype_resolution_on_the_cpu(spec, saved, want):
    assert devices.resolve_dtype(spec, torch.device("cpu"), saved) == want


def test_dtype_checks_what_the_device_can_compute(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(devices, "_bf16_ok", lambda device: device.type != "cuda")
    with pytest.raises(PrunescopeError, match="cannot compute in bfloat16.*float16 or float32"):
        devices.resolve_dtype("bfloat16", cuda)
    assert devices.resolve_dtype("auto", cuda, torch.bfloat16) == torch.float32
    assert devices.resolve_dtype("auto", cuda, torch.float16) == torch.float16  # a GPU computes float16
    with pytest.raises(PrunescopeError, match="unknown dtype 'fp8'; choose one of auto, float32, bfloat16, float16"):
        devices.resolve_dtype("fp8")
    with pytest.raises(PrunescopeError, match="unsupported dtype"):
        devices.resolve_dtype(torch.int8)


def test_checkpoint_dtype_reads_both_spellings():
    class Config:
        dtype = "bfloat16"

    class Old:
        torch_dtype = torch.float16

    assert devices.checkpoint_dtype(Config()) == torch.bfloat16
    assert devices.checkpoint_dtype(Old()) == torch.float16
    assert devices.checkpoint_dtype(object()) is None


def test_job_configs_check_placement_before_any_work(no_accelerator):
    with pytest.raises(PrunescopeError, match="not present"):
        pipeline.PruneConfig(device="cuda")
    with pytest.raises(PrunescopeError, match="unknown dtype"):
        ShrinkConfig(dtype="half")
    assert ShrinkConfig(dtype="bfloat16").dtype == "bfloat16"


def test_load_in_a_chosen_dtype_and_auto_keeps_the_checkpoints(tiny_model_dir, tmp_path):
    model, tokenizer = models.load(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    again, _ = models.load(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    full, _ = models.load(tiny_model_dir)  # saved in float32
    assert {p.dtype for p in full.parameters()} == {torch.float32}


def test_perplexity_sums_in_float64_and_matches_a_direct_computation():
    model = tiny_llama()
    with torch.no_grad():
        logits = model(input_ids=BLOCKS).logits.double()  # [n, L, V]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), BLOCKS[:, 1:].flatten())
    assert evaluate.perplexity(model, BLOCKS, batch_size=3, progress=False) == pytest.approx(
        math.exp(nll.item()), rel=1e-5
    )


def test_bfloat16_magnitude_masks_equal_float32_where_scores_are_tie_free():
    """Weights exactly representable in bfloat16: the scores are the same numbers, so the masks
    must be the same (a lossy score path in half precision would show here)."""
    full = tiny_llama()
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    half = copy.deepcopy(full).to(torch.bfloat16)
    for model in (full, half):
        layers = pipeline.select_linear_layers(model)
        pipeline.prune_model(model, layers, "magnitude", SparsityPattern(0.5), "layer", None)
    for (name, a), b in zip(full.named_parameters(), half.parameters()):
        if a.ndim == 2 and "embed" not in name and "lm_head" not in name:
            w = a.detach().abs().flatten()
            if w.unique().numel() == w.numel():  # tie-free
                assert torch.equal(a == 0, b == 0), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_calibrated_pruning_stays_close_to_float32(method):
    full = tiny_llama()
    half = copy.deepcopy(full).to(torch.bfloat16)
    for model in (full, half):
        layers = pipeline.select_linear_layers(model)
        pipeline.prune_model(model, layers, method, SparsityPattern(0.5), "row", BLOCKS)
    agree, total = 0, 0
    for (name, a), b in zip(full.named_parameters(), half.parameters()):
        if a.ndim == 2 and "embed" not in name and "lm_head" not in name:
            assert b.dtype == torch.bfloat16, name
            assert (b == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
            assert torch.isfinite(b.float()).all(), name
            agree += int(((a == 0) == (b == 0)).sum())
            total += a.numel()
    assert agree / total > 0.9  # bfloat16 activations move a few near-threshold choices, not most
    ppl_full = evaluate.perplexity(full, BLOCKS, progress=False)
    ppl_half = evaluate.perplexity(half, BLOCKS, progress=False)
    assert ppl_half == pytest.approx(ppl_full, rel=0.05)


def test_bfloat16_shrink_keeps_the_dtype_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_family_model("llama").save_pretrained(tmp_path / "dense")
    # loaded as a user loads it (rotary frequencies stay float32; .to(bfloat16) would round them)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    config = ShrinkConfig(model="tiny", mlp=0.25, kv_groups=1, multiple_of=8, calib_samples=4, calib_seqlen=24,
                          calib_batch_size=2, evaluate=False, latency_rounds=0)
    shrunk, _, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    assert {p.dtype for p in shrunk.parameters()} == {torch.bfloat16}
    shrunk.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(again(input_ids=BLOCKS).logits, shrunk(input_ids=BLOCKS).logits)


def test_meta_device_plans_and_counts_without_weights():
    """Planning needs only shapes: a model on the meta device gets the same plan and the same
    --target-params width as the real one."""
    real = tiny_family_model("llama")
    with torch.device("meta"):
        meta = type(real)(real.config)
    assert devices.resolve_device("meta") == torch.device("meta")
    for kw in (dict(mlp=0.25, kv_groups=1), dict(target_params=0.7, kv_groups=1)):
        config = ShrinkConfig(model="tiny", multiple_of=8, **kw)
        assert make_plan(config, meta) == make_plan(config, real)
    assert models.describe(meta)["parameters"] == models.describe(real)["parameters"]
    assert pipeline.select_linear_layers(meta).keys() == pipeline.select_linear_layers(real).keys()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_on_cuda_matches_cpu(method):
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    for model in (cpu, gpu):
        pipeline.prune_model(model, pipeline.select_linear_layers(model), method, SparsityPattern(0.5), "row", BLOCKS)
    agree = [float(((a == 0) == (b.cpu() == 0)).float().mean()) for a, b in zip(cpu.parameters(), gpu.parameters())]
    assert min(agree) > 0.98  # float32 on both; kernels differ in rounding only
    assert evaluate.perplexity(gpu, BLOCKS, progress=False) == pytest.approx(
        evaluate.perplexity(cpu, BLOCKS, progress=False), rel=1e-3
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_load_auto_picks_cuda(tiny_model_dir):
    model, _ = models.load(tiny_model_dir)
    assert next(model.parameters()).is_cuda


@pytest.mark.integration
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bundled_model_pruned_in_bfloat16_matches_float32_perplexity(bundled, method):
    """The issue's bar: Wanda and SparseGPT at 50% in bfloat16 within 2% of the float32 run."""
    from prunescope import data

    full, tok = bundled
    full = copy.deepcopy(full)
    half, _ = models.load(models.DEFAULT_MODEL, dtype="bfloat16", device="cpu")
    tokens = data.tokenize(tok, data.default_text())
    # small sizes: bfloat16 matmuls run about 5x slower than float32 on this CPU
    # 8 windows: with 4, SparseGPT's float32 and bfloat16 runs differ by up to 5% either way
    # from seed to seed (rounding changes masks), which tests noise rather than precision
    calib = data.calibration_blocks(tokens, 8, 256, seed=0)  # [8, 256]
    blocks = data.eval_blocks(tokens, 512, 1024)  # [2, 512]
    ppl = {}
    for name, model in (("float32", full), ("bfloat16", half)):
        pipeline.prune_model(model, pipeline.select_linear_layers(model), method, SparsityPattern(0.5), "row", calib)
        ppl[name] = evaluate.perplexity(model, blocks, progress=False)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.02), ppl
