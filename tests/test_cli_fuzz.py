"""Random option values fed to the CLI: every run ends in exit code 0 (done) or 2 (one line
naming the bad input), never a traceback (exit code 1 is kept for bugs)."""

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunescope import cli

NUMBERS = st.one_of(
    st.integers(-3, 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["", "x", "1e9", "0.5.5", "-0", "2:4", "nan"]),
)
PRUNE_OPTIONS = {
    "--sparsity": NUMBERS,
    "--method": st.sampled_from(["magnitude", "wanda", "sparsegpt", "owl", ""]),
    "--pattern": st.sampled_from(["unstructured", "2:4", "4:8", "5:3", "0:4", "a:b", "2:"]),
    "--scope": st.sampled_from(["global", "layer", "row", "column"]),
    "--calib-samples": NUMBERS,
    "--calib-seqlen": NUMBERS,
    "--eval-seqlen": NUMBERS,
    "--dtype": st.sampled_from(["auto", "float32", "bfloat16", "float8", "int4"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:7", "tpu", "meta"]),
}
SHRINK_OPTIONS = {
    "--mlp": NUMBERS,
    "--kv-groups": NUMBERS,
    "--heads-per-group": NUMBERS,
    "--drop-layers": NUMBERS,
    "--multiple-of": NUMBERS,
    "--criterion": st.sampled_from(["flap", "wanda-sp", "magnitude", "random"]),
    "--compensation": st.sampled_from(["none", "bias", "lstsq", "ridge"]),
    "--calib-samples": NUMBERS,
    "--damp": NUMBERS,
}
# small counts for commands whose cost grows with them (tables x rows, training steps, items)
SMALL = st.one_of(st.integers(-2, 4).map(str), st.sampled_from(["", "x", "1.5", "nan", "1e9"]))
FRACTIONS = st.one_of(
    st.floats(-0.5, 1.5, width=32).map(repr), st.sampled_from(["", "nan", "inf", "0", "1", "0.5,0.5", "a,b"])
)
ACTIVATIONS_OPTIONS = {
    "--tokens": NUMBERS,
    "--seqlen": NUMBERS,
    "--batch": SMALL,
    "--eps": FRACTIONS,
    "--token-eps": NUMBERS,
    "--sample-every": NUMBERS,
    "--swap": st.sampled_from(["relu", "gelu", "silu", "tanh"]),
    "--threshold": FRACTIONS,
    "--calib-tokens": NUMBERS,
    "--eval-tokens": NUMBERS,
    "--eval-seqlen": NUMBERS,
    "--dtype": st.sampled_from(["auto", "float32", "bfloat16", "int4"]),
}
STUDY_OPTIONS = {
    "--acts": st.sampled_from(["relu", "gelu,silu", "mish", "swish", "", ",", "relu,relu"]),
    "--seeds": st.sampled_from(["0", "0,1", "-1", "x", "", "1e9"]),
    "--steps": SMALL,
    "--study-batch": SMALL,
    "--study-seqlen": SMALL,
    "--d-model": st.sampled_from(["16", "8", "3", "0", "-4", "x"]),
    "--layers": SMALL,
    "--lr": NUMBERS,
}
PROBE_OPTIONS = {
    "--rows": SMALL,
    "--samples": SMALL,
    "--seed": NUMBERS,
    "--mode": st.sampled_from(["exact", "sample", "both", ""]),
    "--draws": st.sampled_from(["rqmc", "iid", "sobol", ""]),
    "--exact-columns": st.sampled_from(["Age", "Name,Gender", "Height", "", ","]),
    "--temperature": NUMBERS,
    "--batch": SMALL,
    "--target": st.sampled_from(["uniform", "none", "zipf", ""]),
    "--calib-samples": SMALL,
}
LORA_COMPRESS_OPTIONS = {
    "--energy": NUMBERS,
    "--max-rank": SMALL,
    "--min-rank": SMALL,
}
EVAL_OPTIONS = {
    "--tasks": st.sampled_from(["prunescope_facts", "no_such_task", "", ",", "prunescope_facts,prunescope_facts"]),
    "--limit": SMALL,
    "--batch-size": SMALL,
    "--dtype": st.sampled_from(["auto", "float32", "float8"]),
}
EDIT_OPTIONS = {
    "--target": st.sampled_from(["Gender=uniform", "Age.digit1=uniform:2-6", "Height=uniform", "Gender=Male:2",
                                 "", "Gender@9=uniform", "Age.digit4=uniform", "Age=uniform"]),
    "--method": st.sampled_from(["fit", "caa,ablate", "all", "rome", "", "weight-null", "units"]),
    "--layers": st.sampled_from(["0", "0-1", "5", "-1", "x", "", "1-0"]),
    "--strength": NUMBERS,
    "--rows": SMALL,
    "--measure-rows": SMALL,
    "--steps": SMALL,
    "--lr": NUMBERS,
    "--lr-final": NUMBERS,
    "--fit-loss": st.sampled_from(["kl", "js", "l2", ""]),
    "--template-power": st.sampled_from(["1", "4", "0.5", "nan", "inf", "x"]),
    "--prompt-dropout": st.sampled_from(["0", "0.15", "1", "-0.1", "nan", "x"]),
    "--prompt-dropout-unit": st.sampled_from(["token", "word", "letter", ""]),
    "--average-last": st.sampled_from(["1", "2", "0", "-1", "1000", "x"]),
    "--kl-weight": NUMBERS,
    "--max-norm": NUMBERS,
    "--units": SMALL,
    "--kl-windows": SMALL,
}
COUNTER = itertools.count()
ZEROSHOT_DATA = Path(__file__).parent / "data" / "zeroshot"


def _options(table: dict) -> st.SearchStrategy[list[str]]:
    """A random subset of ``table``'s options, each with a random value."""
    return st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True).flatmap(
        lambda names: st.tuples(*(table[n] for n in names)).map(
            lambda values: [x for pair in zip(names, values) for x in (pair[0], pair[1])]
        )
    )


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse: a malformed option
        rc = exc.code if isinstance(exc.code, int) else 2
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model (its tokenizer writing each digit as a token, as the probe needs), a text
    file, a LoRA adapter and a local lm-eval task folder for the commands to read."""
    import torch

    from prunescope.data import default_text
    from prunescope.testing import tiny_llama
    from tests.test_lora import PREFIX, hand_adapter
    from prunescope.testing import digit_tokenizer

    root = tmp_path_factory.mktemp("fuzz-inputs")
    tokenizer = digit_tokenizer()
    tiny_llama(vocab_size=max(384, len(tokenizer))).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "t.txt").write_text(default_text()[:12_000])  # the study keeps a tenth for validation
    hand_adapter(root / "adapter", {f"{PREFIX}.{i}.self_attn.{m}.lora_{f}.weight": torch.randn(shape)
                                    for i in range(2) for m in ("q_proj", "v_proj")
                                    for f, shape in (("A", (4, 32)), ("B", (32, 4)))})
    (root / "tasks").mkdir()
    yaml = (ZEROSHOT_DATA / "prunescope_facts.yaml").read_text()
    (root / "tasks" / "prunescope_facts.yaml").write_text(
        yaml.replace("test: facts.jsonl", f"test: {ZEROSHOT_DATA / 'facts.jsonl'}"))
    return {"model": root / "model", "text": root / "t.txt", "adapter": root / "adapter", "tasks": root / "tasks"}


def _base(command: str, inputs: dict[str, Path]) -> list[str]:
    """The fixed part of each command line: tiny sizes, local inputs (random options follow and win)."""
    text, model = str(inputs["text"]), inputs["model"]
    texts = ["--calib-text", text, "--eval-text", text, "--eval-tokens", "64", "--eval-seqlen", "16"]
    return {
        "prune": ["prune", str(model), *texts, "--calib-seqlen", "16", "--calib-samples", "2"],
        "shrink": ["shrink", str(model), *texts, "--latency-rounds", "0", "--calib-seqlen", "16",
                   "--calib-samples", "2", "--multiple-of", "8"],
        "activations": ["activations", str(model), *texts, "--text", text, "--tokens", "64", "--seqlen", "16",
                        "--calib-tokens", "64"],
        "activations study": ["activations", "study", "--study-text", text, "--steps", "2", "--seeds", "0",
                              "--acts", "relu", "--d-model", "16", "--study-batch", "2", "--study-seqlen", "16"],
        "probe": ["probe", str(model), "--rows", "2", "--samples", "2", "--batch", "2", "--no-calibration"],
        "lora compress": ["lora", "compress", str(inputs["adapter"])],
        "eval": ["eval", str(model), "--tasks", "prunescope_facts", "--include-path", str(inputs["tasks"]),
                 "--limit", "2"],
        "edit": ["edit", str(model), "--target", "Gender=uniform", "--method", "fit", "--strength", "1",
                 "--steps", "1", "--fit-tables", "2", "--fit-rewordings", "0", "--measure-tables", "2", "--eval-text", text,
                 "--eval-tokens", "64", "--eval-seqlen", "16"],
    }[command]


@pytest.mark.parametrize("command, table, examples", [
    ("prune", PRUNE_OPTIONS, 25),
    ("shrink", SHRINK_OPTIONS, 25),
    ("activations", ACTIVATIONS_OPTIONS, 15),
    ("activations study", STUDY_OPTIONS, 15),
    ("probe", PROBE_OPTIONS, 15),
    ("lora compress", LORA_COMPRESS_OPTIONS, 15),
    ("eval", EVAL_OPTIONS, 6),
    ("edit", EDIT_OPTIONS, 25),
])
def test_random_options_end_in_done_or_one_line(command, table, examples, fuzz_inputs, tmp_path_factory, capsys):
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(options=_options(table))
    def check(options: list[str]) -> None:
        out = tmp_path_factory.getbasetemp() / f"fuzz-{command.replace(' ', '-')}-{next(COUNTER)}"
        argv = [*_base(command, fuzz_inputs), *options, "--out", str(out)]
        rc, err = _run(argv, capsys)
        assert rc in (0, 2), (argv, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
        if rc == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert lines and ("error:" in lines[-1]), (argv, err[-2000:])
            assert not out.exists() or not any(out.iterdir()), (argv, err[-2000:])

    check()


@pytest.mark.parametrize("command", ["prune", "shrink", "activations", "probe"])
def test_the_meta_device_is_refused_by_the_commands(command, capsys):
    """Found by the random-options test: ``--device meta`` ran until a tensor had to be read."""
    rc, err = _run([command, "--device", "meta"], capsys)
    assert rc == 2
    assert "'meta' holds shapes but no data and cannot compute; choose one of auto, cpu" in err


@pytest.mark.parametrize("command", ["prune", "shrink", "activations", "activations study", "probe", "lora compress", "eval",
                                     "edit"])
def test_the_fixed_command_lines_succeed(command, fuzz_inputs, tmp_path, capsys):
    """The random options above start from command lines that work, so a run that ends in exit
    code 2 was refused for an option the test chose."""
    rc, err = _run(["-q", *_base(command, fuzz_inputs), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err[-2000:]
    assert (tmp_path / "out" / "report.json").is_file()


def test_a_swap_with_eps_without_the_token_eps_reports(fuzz_inputs, tmp_path, capsys):
    """Found by the random options: ``--swap relu --eps 1`` ended in a KeyError (the report looked
    up the near-zero fraction at the token eps 0.1, measured only at --eps)."""
    out = tmp_path / "out"
    rc, err = _run(["-q", *_base("activations", fuzz_inputs), "--swap", "relu", "--eps", "1", "--out", str(out)], capsys)
    assert rc == 0, err[-2000:]
    assert "abs<1 rms" in (out / "report.md").read_text()


def test_a_diverging_study_is_one_line(fuzz_inputs, tmp_path, capsys):
    """Found by the random options: ``--lr 5.6e16`` made the weights NaN and the profiler's
    histogram raised (a traceback); now the divergence is named, with the option to change."""
    rc, err = _run([*_base("activations study", fuzz_inputs), "--lr", "5.6e16", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "Traceback" not in err
    assert "diverged at step" in err and "lower --lr (now 5.6e+16)" in err
    assert not (tmp_path / "o").exists()
