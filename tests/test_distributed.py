"""Calibration split across 2 CPU processes (gloo) gives the single-process result: the same
masks and weights for Wanda and SparseGPT, the same shrunk model, the same perplexity; and the
CLI under torchrun writes one report and one model that match a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunescope import distributed, evaluate
from prunescope.errors import PrunescopeError
from prunescope.pruning import job as pipeline
from prunescope.pruning.patterns import SparsityPattern
from prunescope.pruning.shrink import ShrinkConfig, make_plan, shrink_model
from prunescope.testing import tiny_family_model, tiny_llama

BLOCKS = torch.randint(0, 384, (6, 24), generator=torch.Generator().manual_seed(1))
SHRINK = dict(model="tiny", mlp=0.25, kv_groups=1, drop_layers=1, multiple_of=8, calib_samples=6,
              calib_seqlen=24, calib_batch_size=2, evaluate=False, latency_rounds=0)


def _run_all() -> dict[str, object]:
    """Everything compared: run identically in one process and in each of two."""
    out: dict[str, object] = {}
    for method in ("wanda", "sparsegpt"):
        model = tiny_llama()
        layers = pipeline.select_linear_layers(model)
        pipeline.prune_model(model, layers, method, SparsityPattern(0.5), "row", BLOCKS, batch_size=2)
        out[method] = {k: v.clone() for k, v in model.state_dict().items()}
    model = tiny_family_model("llama")
    config = ShrinkConfig(**SHRINK)
    shrunk, outcomes, _ = shrink_model(model, config, make_plan(config, model), BLOCKS)
    out["shrink"] = {k: v.clone() for k, v in shrunk.state_dict().items()}
    out["influence"] = [o.block_influence for o in outcomes]
    out["ppl"] = evaluate.perplexity(tiny_llama(), BLOCKS, batch_size=2, progress=False)
    return out


def _worker(rank: int, world: int, init_file: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert distributed.active() and distributed.rank() == rank
        results = _run_all()
        distributed.agree("the config", "same everywhere")  # passes
        try:
            distributed.agree("the config", f"method=wanda{rank}")
        except PrunescopeError as exc:
            results["disagreement"] = str(exc)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return _run_all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_and_weights_equal_the_single_process_run(two_processes, one_process, method):
    single = one_process[method]
    for results in two_processes:  # both processes hold the same model
        got = results[method]
        for name, w in single.items():
            assert torch.equal(got[name] == 0, w == 0), name  # the same masks
            if method == "wanda":
                assert torch.equal(got[name], w), name
            else:  # the Hessian summed in another order: float rounding only
                torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5)


def test_shrink_and_block_influence_equal_the_single_process_run(two_processes, one_process):
    for got in two_processes:
        assert got["influence"] == pytest.approx(one_process["influence"], rel=1e-5)
        assert got["shrink"].keys() == one_process["shrink"].keys()
        for name, w in one_process["shrink"].items():
            torch.testing.assert_close(got["shrink"][name], w, rtol=1e-4, atol=1e-5)


def test_perplexity_sums_over_processes(two_processes, one_process):
    for got in two_processes:
        assert got["ppl"] == pytest.approx(one_process["ppl"], rel=1e-6)


def test_without_a_launcher_everything_is_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.active()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(BLOCKS) is BLOCKS
    assert distributed.sum_numbers(1.5, 2) == (1.5, 2)
    distributed.refuse("anything")  # no launcher: nothing to refuse


def test_launched_jobs_refuse_what_runs_in_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrunescopeError, match="recovery .* runs in one process; launch it without torchrun"):
        ShrinkConfig(recover_steps=10)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(PrunescopeError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env(torch.device("cpu"))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _cli(folder: Path, text: Path, out: Path, launcher: list[str], *extra: str,
         command: tuple[str, ...] = ("prune", "--method", "sparsegpt", "--save")) -> subprocess.CompletedProcess:
    args = [command[0], str(folder), *command[1:], "--calib-text", str(text), "--eval-text", str(text),
            "--calib-samples", "4", "--calib-seqlen", "16", "--calib-batch", "2", "--eval-tokens", "64",
            "--eval-seqlen", "16", "--device", "cpu", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "prunescope", *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_under_torchrun_writes_one_report_matching_one_process(tiny_model_dir, tmp_path):
    from prunescope import formats
    from prunescope.data import default_text

    text = tmp_path / "t.txt"
    text.write_text(default_text()[:20_000])
    single = _cli(tiny_model_dir, text, tmp_path / "one", [sys.executable])
    assert single.returncode == 0, single.stderr
    launched = _cli(tiny_model_dir, text, tmp_path / "two", TORCHRUN)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["pruned_ppl"] == pytest.approx(one["pruned_ppl"], rel=1e-4)
    assert two["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-6)
    a, b = formats.load_sparse(tmp_path / "one" / "model"), formats.load_sparse(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: v for file in sorted(set(index.values())) for k, v in load_file(str(folder / file)).items()}


@pytest.mark.parametrize("command", [
    ("prune", "--method", "sparsegpt", "--save"),
    ("shrink", "--mlp", "0.25", "--kv-groups", "1", "--drop-layers", "1", "--multiple-of", "8", "--latency-rounds", "0"),
])
def test_offloaded_runs_under_torchrun_match_one_process(tiny_model_dir, tmp_path, command):
    from prunescope.data import default_text

    text = tmp_path / "t.txt"
    text.write_text(default_text()[:20_000])
    single = _cli(tiny_model_dir, text, tmp_path / "one", [sys.executable], "--offload", command=command)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = _cli(tiny_model_dir, text, tmp_path / "two", TORCHRUN, "--offload", command=command)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["offloaded"] and two["offloaded"]
    assert two["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-6)
    assert two["pruned_ppl"] == pytest.approx(one["pruned_ppl"], rel=1e-4)
    a, b = _shards(tmp_path / "one" / "model"), _shards(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob("*/.*tmp*"))  # no temporary folder left by any process


def test_processes_started_differently_refuse_in_every_process(two_processes):
    want = ("the 2 processes disagree on the config: process 0 has 'method=wanda0', process 1 has "
            "'method=wanda1'; start every process with the same command")
    assert [results.get("disagreement") for results in two_processes] == [want, want]
