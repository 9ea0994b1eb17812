"""``prunescope shrink`` end to end on a tiny model folder, and its bad inputs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunescope import cli

SMALL = ["--multiple-of", "8", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch", "2",
         "--eval-tokens", "128", "--eval-seqlen", "32", "--prefill-tokens", "32", "--decode-tokens", "4",
         "--latency-rounds", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with 3 layers (save_tiny_model has 2) so one can be dropped and two stay."""
    from prunescope.testing import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny3")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=max(384, len(tok)), num_layers=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(model_dir, text_file, out, *argv):
    return cli.main(["shrink", str(model_dir), "--calib-text", text_file, "--eval-text", text_file,
                     *SMALL, "--out", str(out), *argv])


def test_shrink_end_to_end_writes_a_model_plain_transformers_loads(model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    rc = _run(model_dir, text_file, out, "--mlp", "0.5", "--kv-groups", "1", "--drop-layers", "1",
              "--compensation", "bias", "--recover-steps", "2", "--recover-seqlen", "32")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dense_ppl"] > 1 and report["pruned_ppl"] > 1 and report["recovered_ppl"] > 1
    assert report["shrunk_params"] < report["dense_params"]
    assert report["shrunk_shape"] == {"intermediate": 32, "heads": 2, "kv_heads": 1}
    assert report["shrunk_layers"] == 2 and len(report["dropped_layers"]) == 1
    assert report["latency"]["prefill_speedup"] > 0 and report["latency"]["decode_speedup"] > 0
    assert report["config_changes"]["mlp_bias"] == [False, True]
    assert len(report["recovery"]["losses"]) == 2
    assert (out / "report.md").read_text().startswith("# prunescope shrink")
    assert (out / "summary.png").stat().st_size > 1000 and (out / "layers.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.intermediate_size == 32 and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) == report["shrunk_params"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_target_params_and_no_save(model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    assert _run(model_dir, text_file, out, "--target-params", "0.7", "--criterion", "magnitude",
                "--compensation", "none", "--no-save", "--no-eval", "--latency-rounds", "0") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layer_params_kept"] <= 0.7 and report["calib_samples"] == 0  # magnitude needs no data
    assert report["latency"] is None and report["dense_ppl"] is None
    assert not (out / "model").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mlp", "1.0"], "--mlp is the fraction of MLP channels to remove, in [0, 1), got 1.0"),
        (["--mlp", "0.01"], "nothing would be removed"),
        (["--mlp", "0.99"], "every unit would be removed"),
        (["--mlp", "0"], "these options remove nothing"),
        (["--kv-groups", "2"], "--kv-groups 2 must be below the model's 2 KV groups"),
        (["--heads-per-group", "2"], "must be below the 2 query heads in each KV group"),
        (["--multiple-of", "128"], "--multiple-of 128 must be between 1 and the MLP width (64)"),
        (["--drop-layers", "1", "--multiple-of", "128"], None),
        (["--drop-layers", "3"], "would drop every one of the 3 layers"),
        (["--criterion", "obs"], "unknown criterion 'obs'; choose one of magnitude, wanda-sp, flap"),
        (["--compensation", "ridge"], "unknown compensation 'ridge'; choose one of none, bias, lstsq"),
        (["--mlp", "0.25", "--target-params", "0.8"], "pass one of them"),
        (["--target-params", "1.5"], "in (0, 1), got 1.5"),
        (["--recover-mode", "qlora"], "unknown recover mode 'qlora'"),
        (["--calib-samples", "5000"], "too short for 5000 samples"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(model_dir, text_file, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    if message is None:  # not bad: --multiple-of only matters where the MLP is shrunk
        assert _run(model_dir, text_file, out, *argv, "--no-eval", "--latency-rounds", "0", "--no-save") == 0
        return
    assert _run(model_dir, text_file, out, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_unsupported_family_is_one_line(tmp_path, capsys):
    from transformers import GPTNeoXConfig

    folder = tmp_path / "neox"
    AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=384, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    )).save_pretrained(folder)
    from prunescope.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    assert cli.main(["shrink", str(folder), "--out", str(tmp_path / "o"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "does not support model type 'gpt_neox'" in err and "Qwen3" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert cli.main(["shrink", str(model_dir), "--out", str(out), "--no-eval"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_help_explains_the_units(capsys):
    with pytest.raises(SystemExit):
        cli.main(["shrink", "--help"])
    text = capsys.readouterr().out
    for word in ("--mlp", "--kv-groups", "--drop-layers", "--target-params", "--criterion", "--compensation",
                 "--multiple-of", "--recover-steps", "AutoModelForCausalLM.from_pretrained"):
        assert word in text

