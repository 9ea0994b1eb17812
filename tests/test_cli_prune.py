import json

import pytest

from prunescope import cli
from prunescope.errors import PrunescopeError


def test_help_lists_prune(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "prune" in capsys.readouterr().out


def test_default_method_is_sparsegpt_and_says_how_to_go_further(quick_prune, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO")
    rc = quick_prune(out)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["method"], report["scope"], report["calib_samples"]) == ("sparsegpt", "block", 4)
    assert report["sparsity_actual"] == pytest.approx(0.5)
    assert "--allocation owl" in caplog.text and "prunescope shrink" in caplog.text
    assert "--method magnitude" in caplog.text


def test_prune_tiny_model_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    rc = cli.main([
        "prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.3", "--eval-tokens", "64",
        "--eval-seqlen", "16", "--out", str(out),
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_actual"] == pytest.approx(0.3, abs=1e-3)
    assert (report["method"], report["scope"], report["pattern"]) == ("magnitude", "global", "unstructured")
    assert report["calib_samples"] == 0 and report["calib_text"] is None  # magnitude needs no calibration
    assert report["dense_ppl"] > 1 and report["pruned_ppl"] > 1
    assert len(report["layers"]) == 2 * 7
    assert (out / "report.md").read_text().startswith("# prunescope prune")
    assert (out / "sparsity.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1.5"], "sparsity must be in (0, 1)"),
        (["--method", "bogus"], "unknown method 'bogus'"),
        (["--include", "nothing*"], "no Linear layer matches"),
        (["--pattern", "3:2"], "N:M pattern needs integers 0 < N < M, got 3:2"),
        (["--pattern", "0:4"], "N:M pattern needs integers 0 < N < M, got 0:4"),
        (["--pattern", "2:x"], "bad N:M pattern '2:x'"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts pattern '2:4'"),
        (["--method", "wanda", "--pattern", "3:5"], "model.layers.0.self_attn.q_proj.weight has shape (32, 32)"),
        (["--method", "wanda", "--calib-samples", "5000"], "too short for 5000 samples of 512 tokens"),
        (["--method", "magnitude", "--scope", "block"], "scope 'block' is not available for magnitude"),
        (["--method", "wanda,sparsegpt"], "several methods need --sweep"),
    ],
)
def test_prune_bad_input(tiny_model_dir, text_file, tmp_path, capsys, argv, message):
    rc = cli.main([
        "prune", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib-text", text_file,
        "--eval-text", text_file, "--eval-tokens", "64", "--eval-seqlen", "16", *argv,
    ])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prune_refuses_existing_out(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert cli.main(["prune", str(tiny_model_dir), "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_model_is_one_line(tmp_path, capsys):
    assert cli.main(["prune", str(tmp_path / "missing-model"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_nm_end_to_end(quick_prune, tmp_path, method):
    out = tmp_path / "run"
    assert quick_prune(out, "--method", method, "--pattern", "2:4") == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "method", "pattern", "sparsity_requested", "sparsity_actual", "dense_ppl",
                "pruned_ppl", "prune_seconds", "layers"):
        assert key in report
    assert report["method"] == method and report["pattern"] == "2:4" and report["scope"] == "group"
    assert report["sparsity_requested"] == 0.5 and report["sparsity_actual"] == pytest.approx(0.5)
    assert report["calib_samples"] == 4 and report["calib_seqlen"] == 16
    assert all(layer["sparsity"] == pytest.approx(0.5) for layer in report["layers"])
    md = (out / "report.md").read_text()
    assert f"{method} (group, 2:4)" in md and "4 x 16 tokens" in md


def test_sweep_draws_one_figure(quick_prune, tmp_path):
    out = tmp_path / "sweep"
    rc = quick_prune(out, "--method", "magnitude,wanda", "--sweep", "0.3,0.6")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [(p["method"], p["sparsity"]) for p in report["sweep"]] == [
        ("magnitude", 0.3), ("magnitude", 0.6), ("wanda", 0.3), ("wanda", 0.6)
    ]
    assert report["method"] == "magnitude" and report["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "sweep.png").stat().st_size > 1000
    assert "## Sweep" in (out / "report.md").read_text()


def test_bad_sweep_value_is_rejected(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", str(tiny_model_dir), "--sweep", "0.3,abc", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "comma-separated fractions" in capsys.readouterr().err


@pytest.mark.integration
def test_bundled_wanda_2_4_on_two_layers(tmp_path):
    out = tmp_path / "bundled"
    rc = cli.main([
        "prune", "--method", "wanda", "--pattern", "2:4", "--include", "model.layers.0.*",
        "--include", "model.layers.1.*", "--calib-samples", "4", "--calib-seqlen", "64", "--no-eval",
        "--out", str(out),
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 14 and report["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)  # a few zeros were already there
    assert report["calib_activation_bytes"] == 2 * 4 * 64 * 576 * 4


def test_save_calls_the_sparse_checkpoint_writer(quick_prune, tmp_path, monkeypatch):
    """--save hands the pruned model to prunescope.formats.save_sparse(model, OUT/model) and
    puts what it reports into the report (the writer itself is tested with formats.py)."""
    from prunescope import formats

    calls = []

    def save_sparse(model, folder, tokenizer=None):
        calls.append((model, folder, sum(int((p == 0).sum()) for p in model.parameters()), tokenizer))
        return {"file_bytes": 123, "dense_file_bytes": 456, "tensors": ["per-tensor stats stay out"]}

    monkeypatch.setattr(formats, "save_sparse", save_sparse)
    out = tmp_path / "saved"
    assert quick_prune(out, "--no-eval", "--save") == 0
    assert len(calls) == 1 and calls[0][1] == out / "model" and calls[0][2] > 0  # the pruned model
    assert calls[0][3] is not None  # the tokenizer is saved with it
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == {"file_bytes": 123, "dense_file_bytes": 456, "path": str(out / "model")}
    assert "checkpoint file_bytes" in (out / "report.md").read_text()


def _failing_command(monkeypatch, exc: BaseException) -> None:
    """Make ``prunescope prune`` raise ``exc`` from inside its run (after parsing)."""
    from prunescope.commands import prune as command

    def boom(args):
        raise exc

    monkeypatch.setattr(command, "run", boom)


def test_an_os_error_is_one_line_exit_2(monkeypatch, capsys):
    import errno

    _failing_command(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/full/report.json"))
    assert cli.main(["prune"]) == 2
    err = capsys.readouterr().err
    assert err == "prunescope prune: error: No space left on device (/full/report.json)\n"


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    _failing_command(monkeypatch, ZeroDivisionError("division by zero"))
    assert cli.main(["prune"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: division by zero" in err
    assert "internal error: this is a bug in prunescope; please report it" in err


def test_debug_shows_the_traceback_of_expected_errors(monkeypatch, capsys):
    _failing_command(monkeypatch, PrunescopeError("bad option"))
    assert cli.main(["prune"]) == 2
    assert capsys.readouterr().err == "prunescope prune: error: bad option\n"
    assert cli.main(["--debug", "prune"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prunescope prune: error: bad option\n")


def test_a_model_folder_without_tokenizer_is_one_line(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert cli.main(["prune", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no usable tokenizer" in err[0] and "tokenizer.save_pretrained" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
