"""``prunescope lora spectrum`` and ``prunescope lora compress`` end to end on tiny adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunescope import cli
from tests.test_lora import PREFIX, hand_adapter, peft_adapter

REQUIRED = {"name", "layer", "module_type", "rank", "scale", "singular_values", "effective_rank",
            "stable_rank", "energy_rank_90", "energy_rank_95", "energy_rank_99"}


def test_spectrum_writes_report_and_plots(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "one", seed=0)
    peft_adapter(tmp_path / "two", seed=1, r=4)
    assert cli.main(["lora", "spectrum", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(report["modules"]) == 12 and all(REQUIRED <= set(m) for m in report["modules"])
    assert {m["rank"] for m in report["modules"] if m["adapter"] == "two"} == {4}
    assert report["type_summaries"] and report["comparisons"] and not report["failures"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| one |" in md and "| two |" in md and "Wilcoxon" in md
    for png in ("spectra.png", "effective_rank.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


def test_spectrum_reports_bad_adapter_and_analyses_the_rest(tmp_path: Path, capsys) -> None:
    peft_adapter(tmp_path / "good")
    hand_adapter(tmp_path / "bad", {f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(12, 4)})
    assert cli.main(["lora", "spectrum", str(tmp_path), "--out", str(tmp_path / "rep")]) == 1
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [a["name"] for a in report["adapters"]] == ["good"]
    assert "lora_B.weight" in report["failures"][0]["error"]
    assert "bad" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("argv", [
    ["lora", "spectrum", "{tmp}/nothing"],
    ["lora", "compress", "{tmp}/nothing"],
    ["lora", "compress", "{tmp}/good", "--energy", "1.5"],
    ["lora", "compress", "{tmp}/good", "--min-rank", "0"],
])
def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys, argv: list[str]) -> None:
    peft_adapter(tmp_path / "good")
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunescope lora: error:") and len(err.splitlines()) == 1


def test_compress_writes_adapter_and_report(tmp_path: Path) -> None:
    peft_adapter(tmp_path / "a")
    out = tmp_path / "c"
    assert cli.main(["lora", "compress", str(tmp_path / "a"), "--energy", "0.7", "--max-rank", "5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["new_parameters"] < report["old_parameters"]
    assert all(m["new_rank"] <= 5 and m["old_rank"] == 8 for m in report["modules"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"]) == {m["name"] for m in report["modules"]}
    assert "saving" in (out / "report.md").read_text()
    # the written adapter is itself analysable, and its ranks are the new ones
    assert cli.main(["lora", "spectrum", str(out / "adapter"), "--out", str(tmp_path / "s")]) == 0
    spectra = json.loads((tmp_path / "s" / "report.json").read_text())["modules"]
    assert sorted(m["rank"] for m in spectra) == sorted(m["new_rank"] for m in report["modules"])
