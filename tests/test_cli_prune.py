import json

import pytest

from prunescope import cli


def test_help_lists_prune(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "prune" in capsys.readouterr().out


def test_prune_tiny_model_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    rc = cli.main([
        "prune", str(tiny_model_dir), "--sparsity", "0.3", "--eval-tokens", "64",
        "--eval-seqlen", "16", "--out", str(out),
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_actual"] == pytest.approx(0.3, abs=1e-3)
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
    ],
)
def test_prune_bad_input(tiny_model_dir, tmp_path, capsys, argv, message):
    rc = cli.main(["prune", str(tiny_model_dir), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_prune_refuses_existing_out(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert cli.main(["prune", str(tiny_model_dir), "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
