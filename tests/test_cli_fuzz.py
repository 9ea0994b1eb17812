"""Random option values fed to the CLI: every run ends in exit code 0 (done) or 2 (one line
naming the bad input), never a traceback (exit code 1 is kept for bugs)."""

import itertools

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
COUNTER = itertools.count()


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


@pytest.mark.parametrize("command, table, fixed", [
    ("prune", PRUNE_OPTIONS, ["--calib-seqlen", "16", "--calib-samples", "2"]),
    ("shrink", SHRINK_OPTIONS, ["--latency-rounds", "0", "--calib-seqlen", "16", "--calib-samples", "2"]),
])
def test_random_options_end_in_done_or_one_line(command, table, fixed, tiny_model_dir, tmp_path_factory, capsys):
    from prunescope.data import default_text

    text = tmp_path_factory.mktemp("text") / "t.txt"
    text.write_text(default_text()[:5_000])

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(options=_options(table))
    def check(options: list[str]) -> None:
        out = tmp_path_factory.getbasetemp() / f"fuzz-{command}-{next(COUNTER)}"
        argv = [command, str(tiny_model_dir), "--calib-text", str(text), "--eval-text", str(text),
                "--eval-tokens", "64", "--eval-seqlen", "16", *fixed, *options, "--out", str(out)]
        rc, err = _run(argv, capsys)
        assert rc in (0, 2), (argv, err[-2000:])
        assert "Traceback" not in err, (argv, err[-2000:])
        if rc == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert lines and ("error:" in lines[-1]), (argv, err[-2000:])

    check()


@pytest.mark.parametrize("command", ["prune", "shrink", "activations", "probe"])
def test_the_meta_device_is_refused_by_the_commands(command, capsys):
    """Found by the random-options test: ``--device meta`` ran until a tensor had to be read."""
    rc, err = _run([command, "--device", "meta"], capsys)
    assert rc == 2
    assert "'meta' holds shapes but no data and cannot compute; choose one of auto, cpu" in err
