"""The probe end to end on tiny models: templates, statistics, exact-vs-sampled agreement, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prunescope import cli
from prunescope.errors import PrunescopeError
from prunescope.probe import ProbeConfig, load_template, parse_template, run_probe_on
from prunescope.probe import stats
from prunescope.testing import digit_model, digit_tokenizer, tiny_llama

PEOPLE_COLUMNS = [
    {"name": "Name", "type": "text"},
    {"name": "Gender", "type": "choice", "choices": ["Male", "Female"]},
    {"name": "Age", "type": "digits", "min_length": 1, "max_length": 2},
]


def write_template(tmp_path, data, suffix=".yaml"):
    import yaml

    path = tmp_path / f"t{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return str(path)


# --- templates -----------------------------------------------------------------------------

def test_builtin_people_template():
    t = load_template("people")
    assert [c.name for c in t.columns] == ["Name", "Gender", "Age"]
    assert [c.type for c in t.columns] == ["text", "choice", "digits"]
    assert t.header() == "| Name | Gender | Age |\n|---|---|---|\n"
    assert "10" in t.instruction(10) and "{table}" not in t.instruction(10)
    age = t.columns[2]
    assert age.accepts("27") and not age.accepts("27 years") and not age.accepts("")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_user_template_file(tmp_path, suffix):
    data = {"prompt": "List {rows} people.\n{table}", "columns": PEOPLE_COLUMNS}
    t = load_template(write_template(tmp_path, data, suffix))
    assert t.columns[1].choices == ("Male", "Female")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompt": "x {table}", "columns": [{"name": "A", "type": "date"}]}, "unknown column type 'date'"),
        ({"prompt": "x {table}", "columns": [{"name": "A", "type": "choice", "choices": []}]}, "non-empty 'choices'"),
        ({"prompt": "a table please", "columns": PEOPLE_COLUMNS}, "place for the table"),
        ({"prompt": "x {table}", "columns": []}, "non-empty list"),
        ({"prompt": "x {table}", "columns": [{"name": "A", "type": "digits", "min_length": 3, "max_length": 2}]}, "min_length"),
    ],
)
def test_bad_templates(data, message):
    with pytest.raises(PrunescopeError, match=message):
        parse_template(data, "t.yaml")


@pytest.mark.parametrize("field, value", [("rows", 0), ("samples", 0), ("mode", "guess"), ("temperature", 0.0)])
def test_bad_config(field, value):
    with pytest.raises(PrunescopeError, match=field):
        ProbeConfig(**{field: value})


# --- statistics ----------------------------------------------------------------------------

def test_statistics_on_known_distributions():
    u = np.full(4, 0.25)
    p = np.array([0.7, 0.1, 0.1, 0.1])
    assert stats.entropy_bits(u) == pytest.approx(2.0)
    assert stats.kl_bits(u, u) == pytest.approx(0.0)
    assert stats.kl_bits(p, u) == pytest.approx(2.0 - stats.entropy_bits(p))
    assert stats.kl_bits(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == math.inf
    assert stats.js_distance(p, u) == pytest.approx(stats.js_distance(u, p))
    assert stats.js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    lo, hi = stats.wilson(np.array([0, 5, 10]), 10)
    assert lo[0] == 0.0 and hi[2] == pytest.approx(1.0) and lo[1] < 0.5 < hi[1]
    chi2, pval = stats.chi_square(np.array([70, 10, 10, 10]), u)
    assert chi2 == pytest.approx(108.0) and pval < 1e-10
    assert stats.calibrate(p, p) == pytest.approx(u)
    rng = np.random.default_rng(0)
    picks = list(rng.choice(4, size=4000, p=p))
    res, acc = stats.resample_to_target(picks, p, u, rng)
    assert res == pytest.approx(u, abs=0.05)
    assert acc == pytest.approx(0.1 / 0.25 * 1.0, rel=1e-6)  # 1 / max(u / p)


def test_js_noise_is_the_chance_distance_of_a_mean_of_sampled_prefixes():
    """Identical rows: no noise. Rows that are each nearly one-hot (a name deciding a gender):
    the mean of N of them lies about JS(0.5 + sd, 0.5) from the truth, sd = sqrt(0.25 / N),
    and falls like 1 / sqrt(N)."""
    assert stats.js_noise(np.tile([0.3, 0.7], (16, 1))) == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(stats.js_noise(np.array([[0.5, 0.5]])))
    rng = np.random.default_rng(1)

    def decided(n):
        picks = rng.integers(0, 2, size=n)
        return np.eye(2)[picks] * 0.98 + 0.01  # [n, 2]

    small, large = stats.js_noise(decided(32)), stats.js_noise(decided(512))
    sd = math.sqrt(0.25 / 32)
    typical = stats.js_distance(np.array([0.5 + 0.6745 * sd, 0.5 - 0.6745 * sd]), np.array([0.5, 0.5]))  # median |z|
    assert small == pytest.approx(typical, rel=0.35)
    assert large == pytest.approx(small / 4, rel=0.35)


# --- exact vs sampled, garbage models --------------------------------------------------------

def test_exact_and_sampled_estimates_agree(tmp_path, dtok):
    """Row 2 (after a sampled row 1): the exact marginal lies in the sampled Wilson interval."""
    data = {"prompt": "Numbers:\n{table}", "columns": [{"name": "N", "type": "digits", "min_length": 1, "max_length": 2}]}
    config = ProbeConfig(template=write_template(tmp_path, data), rows=2, samples=400, batch_size=200,
                         calibrate=False, seed=3)
    result = run_probe_on(digit_model(dtok), dtok, config, "tiny-digits")
    f = result.field(2, "N digit 1")
    assert f.sampled_n == 400 and f.exact_prefixes == 400
    counts = np.array(f.sampled_counts)
    lo, hi = stats.wilson(counts, f.sampled_n, z=3.29)  # 99.9% per value
    marginal = np.array(f.exact_marginal)
    assert np.all((marginal >= lo) & (marginal <= hi)), (marginal, counts / f.sampled_n)
    assert stats.entropy_bits(marginal) < math.log2(10) - 0.05  # the biased head is not uniform
    # Averaging exact conditionals has lower variance than counting (law of total variance).
    lo95, hi95 = stats.wilson(counts, f.sampled_n)
    assert np.mean(np.array(f.exact_high) - np.array(f.exact_low)) < np.mean(hi95 - lo95)


def test_model_that_never_writes_a_valid_value_is_reported(dtok):
    model = tiny_llama(vocab_size=max(384, len(dtok)))
    config = ProbeConfig(rows=2, samples=6, batch_size=3, calib_samples=3)
    result = run_probe_on(model, dtok, config, "tiny-random")
    gender = result.field(1, "Gender")
    assert gender.mass_outside > 0.9
    assert gender.sampled_outside == 6
    assert sum(gender.distribution) == pytest.approx(1.0)
    assert gender.calibrated is not None and gender.resampled is not None
    assert result.field(1, "Age digit 1").mass_outside > 0.5
    assert {t.row for t in result.text_fields} == {1, 2}


def test_tokenizer_that_merges_digits_is_refused(tiny_model, tiny_tokenizer_):
    with pytest.raises(PrunescopeError, match="each digit as its own token"):
        run_probe_on(tiny_model, tiny_tokenizer_, ProbeConfig(rows=1, samples=1), "tiny")


def test_missing_tokenizer_is_refused(tiny_model):
    with pytest.raises(PrunescopeError, match="no tokenizer"):
        run_probe_on(tiny_model, None, ProbeConfig(rows=1, samples=1), "tiny")


# --- CLI -------------------------------------------------------------------------------------

def test_cli_probe_writes_the_report(digit_model_dir, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["-q", "probe", str(digit_model_dir), "--rows", "2", "--samples", "4", "--batch", "4",
                   "--calib-samples", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 2 and report["samples"] == 4
    labels = {(f["row"], f["column"], f["position"]) for f in report["fields"]}
    assert {(1, "Gender", None), (1, "Age", 1), (2, "Gender", None), (2, "Age", 1)} <= labels
    assert "## Row 1" in (out / "report.md").read_text()
    for name in ("probe-digits.png", "probe-choices.png", "probe-names.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "0"], "rows must be an integer >= 1"),
        (["--samples", "0"], "samples must be an integer >= 1"),
        (["--template", "nosuch"], "neither a built-in"),
        (["--exact-columns", "Age,Height"], "exact columns ['Height'] are not columns"),
        (["--draws", "sobol"], "draws must be one of iid, rqmc"),
    ],
)
def test_cli_bad_input(digit_model_dir, tmp_path, capsys, args, message):
    rc = cli.main(["probe", str(digit_model_dir), "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_bad_template_file(digit_model_dir, tmp_path, capsys):
    bad = write_template(tmp_path, {"prompt": "x {table}", "columns": [{"name": "A", "type": "colour"}]})
    assert cli.main(["probe", str(digit_model_dir), "--template", bad, "--out", str(tmp_path / "o")]) == 2
    assert "unknown column type 'colour'" in capsys.readouterr().err


def test_probe_with_offload_gives_the_in_memory_distributions(digit_model_dir, tmp_path):
    args = ["-q", "probe", str(digit_model_dir), "--rows", "2", "--samples", "4", "--batch", "4",
            "--calib-samples", "2", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "memory")]) == 0
    assert cli.main([*args, "--offload", "--out", str(tmp_path / "disk")]) == 0
    memory = json.loads((tmp_path / "memory" / "report.json").read_text())
    disk = json.loads((tmp_path / "disk" / "report.json").read_text())
    for key in ("fields", "text_fields", "top_values"):  # exact distributions and sampled tables
        assert json.dumps(disk[key]) == json.dumps(memory[key]), key


def test_cli_model_without_tokenizer(tmp_path, capsys):
    folder = tmp_path / "no-tok"
    tiny_llama().save_pretrained(folder)
    assert cli.main(["probe", str(folder), "--rows", "1", "--samples", "1", "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.integration
def test_bundled_model_small_probe(bundled):
    torch.set_num_threads(1)  # decode steps are tiny: one thread is faster on a shared CPU
    model, tokenizer = bundled
    result = run_probe_on(model, tokenizer, ProbeConfig(rows=1, samples=4, batch_size=4, calibrate=False), "smollm2-135m")
    tens = result.field(1, "Age digit 1")
    assert tens.exact_prefixes == 4 and sum(tens.distribution) == pytest.approx(1.0)
    assert tens.mass_outside < 0.5  # the instruct model writes an age where the scaffold asks for one
    assert result.chat_template and result.field(1, "Gender").mass_outside < 0.9


def test_plain_prompt_without_chat_template():
    from prunescope.probe.tables import build_prompt

    tok = digit_tokenizer()
    t = load_template("people")
    assert build_prompt(tok, t, 3).startswith("<|im_start|>user\n")
    tok.chat_template = None
    assert build_prompt(tok, t, 3) == t.instruction(3) + "\n\n" + t.header()


def test_sampling_mode_counts_only(dtok):
    result = run_probe_on(digit_model(dtok), dtok, ProbeConfig(rows=1, samples=8, batch_size=8, mode="sample"), "tiny")
    f = result.field(1, "Age digit 1")
    assert f.exact_marginal is None and f.mass_outside is None and f.calibrated is None
    n = sum(f.sampled_counts)
    assert n > 0 and f.distribution == pytest.approx([c / n for c in f.sampled_counts])


def test_exact_columns_limit_the_readout_and_save_forwards(dtok):
    """Only the listed columns get exact distributions; skipping the choice scoring costs fewer tokens."""
    from prunescope.probe.tables import write_tables

    template = parse_template({"prompt": "People:\n{table}", "columns": PEOPLE_COLUMNS})
    model = digit_model(dtok)
    full = write_tables(model, dtok, template, 1, 4, seed=0, batch_size=4, progress=False)
    age_only = write_tables(model, dtok, template, 1, 4, seed=0, batch_size=4, progress=False, exact_columns={"Age"})
    assert full.cells[0][1].exact and not age_only.cells[0][1].exact  # Gender scored only in the full run
    assert age_only.cells[0][2].exact  # Age read in both
    assert age_only.forward_tokens < full.forward_tokens
    config = ProbeConfig(rows=1, samples=4, batch_size=4, exact_columns=("Age",), calib_samples=2)
    result = run_probe_on(model, dtok, config, "tiny-digits")
    assert result.field(1, "Gender").exact_marginal is None and result.field(1, "Age digit 1").exact_marginal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")
def test_probe_on_cuda_matches_cpu(dtok):
    model = tiny_llama(vocab_size=max(384, len(dtok)))
    config = ProbeConfig(rows=2, samples=6, batch_size=3, calib_samples=3)
    cpu = run_probe_on(model, dtok, config, "tiny")
    gpu = run_probe_on(model.cuda(), dtok, config, "tiny")
    for a, b in zip(cpu.fields, gpu.fields):
        assert a.exact_marginal == pytest.approx(b.exact_marginal, abs=1e-4)
