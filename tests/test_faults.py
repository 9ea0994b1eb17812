"""Fault injection: damaged inputs, unwritable and full output locations, Ctrl-C during a save.

Every expected failure must end in exit code 2 (130 when interrupted) and exactly one stderr line
``prunescope CMD: error: ...`` naming the file at fault (besides progress: INFO log lines and bars,
which ``-q`` silences; no warning, no second error), never a traceback, and must leave no output
folder (nor a temporary sibling of one). Every damaged input is made here from a tiny
random model, and tried with every subcommand that reads that kind of input.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunescope import atomic, cli, formats, models
from prunescope.errors import PrunescopeError
from prunescope.testing import digit_tokenizer, tiny_llama
from tests.test_lora import PREFIX, hand_adapter

ZEROSHOT_DATA = Path(__file__).parent / "data" / "zeroshot"
TASK = "prunescope_facts"
TEXT = ("Pruning removes weights; activations remove neurons. The quick brown fox jumps over the lazy "
        "dog. | Name | Gender | Age |\n| Alice | Female | 27 |\n") * 100


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The good inputs of :func:`make_inputs` (read-only: each test copies what it damages)."""
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def make_inputs(root: Path) -> dict[str, Path]:
    """A good tiny model folder, a good sparse checkpoint of it, a text file, a task folder and a
    good adapter, under ``root``."""
    model = root / "model"
    tokenizer = digit_tokenizer()  # the probe's Age column needs one token per digit
    tiny_llama(vocab_size=max(384, len(tokenizer))).save_pretrained(model)
    tokenizer.save_pretrained(model)
    pruned = tiny_llama(vocab_size=max(384, len(tokenizer)))
    with torch.no_grad():
        for p in pruned.parameters():
            p.masked_fill_(p.abs() < p.abs().median(), 0.0)  # about half zeros: bitmask layout
    formats.save_sparse(pruned, root / "sparse", tokenizer=tokenizer)
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    yaml = (ZEROSHOT_DATA / f"{TASK}.yaml").read_text()
    (tasks / f"{TASK}.yaml").write_text(yaml.replace("test: facts.jsonl", f"test: {ZEROSHOT_DATA / 'facts.jsonl'}"))
    adapter = hand_adapter(root / "adapter", {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
    })
    return {"model": model, "sparse": root / "sparse", "text": text, "tasks": tasks, "adapter": adapter}


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (capsys swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture()
def stderr_logs(monkeypatch: pytest.MonkeyPatch):
    """Log records on the stderr that capsys reads, at the level the command line chooses
    (``-q``: warnings and errors), as a real run prints them: pytest's own handlers would
    otherwise swallow them, and a warning or a duplicate error logged before the error line would
    go unseen. (The CLI's ``logging.basicConfig`` does nothing where pytest already has handlers.)"""
    root = logging.getLogger()
    handler = logging.StreamHandler(_CurrentStderr())
    saved_level = root.level

    def basic_config(level: int = logging.WARNING, format: str = "%(message)s", **_: object) -> None:
        handler.setFormatter(logging.Formatter(format))
        root.setLevel(level)
        if handler not in root.handlers:
            root.addHandler(handler)

    monkeypatch.setattr(logging, "basicConfig", basic_config)
    yield
    root.removeHandler(handler)
    root.setLevel(saved_level)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of ``prunescope ARGV`` run in this process."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else 2
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


PROGRESS = re.compile(r"^INFO |\d+%\|.*\| *[\d?]+/[\d?]+ \[")  # an INFO log line, a progress bar


def assert_one_line(rc: int, lines: list[str], command: str, *fragments: str) -> None:
    """Exit code 2 and one line ``prunescope COMMAND: error: ...`` holding ``fragments``: the
    last line, and the only one besides progress (INFO lines and bars, which ``-q`` silences)."""
    assert rc == 2, lines
    rest = [line for line in lines if not PROGRESS.search(line)]
    assert len(rest) == 1 and rest[0] == lines[-1], lines
    assert lines[-1].startswith(f"prunescope {command}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert not any("Traceback" in line for line in lines)


def assert_no_output(out: Path) -> None:
    """Neither the output folder nor a temporary sibling of it exists."""
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


# ------------------------------------------------------------------------------ damaged model folders


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncated_weights(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["model"], dst)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 2 // 3])
    return folder, [str(weights), "truncated or damaged", "expected a whole safetensors file"]


def garbage_header(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["model"], dst)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((10**12).to_bytes(8, "little") + b"\x93garbage{" + data[17:])  # length > file
    return folder, [str(weights), "truncated or damaged", "header too large"]


def unreadable_config(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["model"], dst)
    (folder / "config.json").write_bytes(b'{"model_type": "llama", "hidden_size": 3')
    return folder, [str(folder / "config.json"), "cannot be read as a model config"]


def config_disagrees(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["model"], dst)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 48  # the stored tensors are 32 wide
    (folder / "config.json").write_text(json.dumps(config))
    return folder, [str(folder / "model.safetensors"), str(folder / "config.json"), "hidden_size=48",
                    "does not belong to these weights"]


def config_more_layers(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    """Silently random-initialised by transformers before: a config with a layer the weights lack."""
    folder = _copy(inputs["model"], dst)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    return folder, [str(folder / "model.safetensors"), "'model.layers.2.", "num_hidden_layers=3"]


def no_tokenizer(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["model"], dst)
    for name in models.TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    return folder, [str(folder), "has no usable tokenizer", "tokenizer.json"]


def sparse_without_index(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["sparse"], dst)
    (folder / formats.INDEX_FILE).unlink()
    return folder, [str(folder), f"{formats.INDEX_FILE} is missing"]


def sparse_without_a_tensor(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    """One tensor's entries dropped from the file (its metadata kept), the index made to agree."""
    folder = _copy(inputs["sparse"], dst)
    weights = folder / formats.WEIGHTS_FILE
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(weights), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
        kept = {k: handle.get_tensor(k) for k in keys if not k.startswith(name)}
    assert len(kept) < len(keys)
    save_file(kept, str(weights), metadata=metadata)
    index = json.loads((folder / formats.INDEX_FILE).read_text())
    index["weights_bytes"] = weights.stat().st_size
    (folder / formats.INDEX_FILE).write_text(json.dumps(index))
    return folder, [str(weights), repr(name), "is missing from the file"]


def sparse_tensor_unrecorded(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    """One tensor gone from the file and from its metadata: only the config still names it."""
    folder = _copy(inputs["sparse"], dst)
    weights = folder / formats.WEIGHTS_FILE
    name = "model.layers.0.self_attn.k_proj.weight"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != f"tensor:{name}"}
        kept = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(name)}
    save_file(kept, str(weights), metadata=metadata)
    index = json.loads((folder / formats.INDEX_FILE).read_text())
    index["weights_bytes"] = weights.stat().st_size
    (folder / formats.INDEX_FILE).write_text(json.dumps(index))
    return folder, [str(weights), repr(name), str(folder / "config.json"), "the weights are incomplete"]


def sparse_truncated(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["sparse"], dst)
    weights = folder / formats.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder, [str(weights), "truncated"]


MODEL_DAMAGE: dict[str, Callable[[dict[str, Path], Path], tuple[Path, list[str]]]] = {
    f.__name__: f for f in (truncated_weights, garbage_header, unreadable_config, config_disagrees,
                            config_more_layers, no_tokenizer, sparse_without_index, sparse_without_a_tensor,
                            sparse_tensor_unrecorded, sparse_truncated)
}


def model_command(command: str, model: Path, inputs: dict[str, Path]) -> list[str]:
    """``command`` on ``model`` with options that make it cheap on a tiny model."""
    text = str(inputs["text"])
    return {
        "prune": ["prune", str(model), "--method", "magnitude", "--no-eval"],
        "shrink": ["shrink", str(model), "--criterion", "magnitude", "--compensation", "none", "--no-eval",
                   "--latency-rounds", "0", "--multiple-of", "8", "--no-save"],
        "activations": ["activations", str(model), "--text", text, "--tokens", "64", "--seqlen", "16"],
        "probe": ["probe", str(model), "--rows", "2", "--samples", "2", "--batch", "2", "--no-calibration"],
        "eval": ["eval", str(model), "--tasks", TASK, "--include-path", str(inputs["tasks"]), "--limit", "2"],
        "edit": ["edit", str(model), "--target", "Gender=uniform", "--method", "fit", "--strength", "1",
                 "--steps", "1", "--fit-tables", "2", "--fit-rewordings", "0", "--measure-tables", "2", "--eval-text", text,
                 "--eval-tokens", "64", "--eval-seqlen", "16"],
    }[command]


MODEL_COMMANDS = ("prune", "shrink", "activations", "probe", "eval", "edit")


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_damaged_model_folder_is_one_line_naming_the_file(command, damage, inputs, tmp_path, capsys, stderr_logs):
    folder, fragments = MODEL_DAMAGE[damage](inputs, tmp_path / "damaged")
    out = tmp_path / "out"
    rc, lines = run_cli([*model_command(command, folder, inputs), "--out", str(out)], capsys)
    assert_one_line(rc, lines, command, *fragments)
    assert_no_output(out)


def test_the_shape_check_accepts_every_family_it_may_see(tmp_path):
    """No false alarm: each family's own save_pretrained folder passes the config/weights check."""
    from prunescope import integrity
    from prunescope.testing import FAMILIES, tiny_family_model

    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    for family in FAMILIES:
        folder = tmp_path / family
        tiny_family_model(family).save_pretrained(folder)
        integrity.check_model_folder(folder)
    # transformers 5 saves GPT-NeoX's head as embed_out, a name the model it builds does not use
    AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=384, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    )).save_pretrained(tmp_path / "neox")
    integrity.check_model_folder(tmp_path / "neox")
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    integrity.check_model_folder(tmp_path / "tied")


# ------------------------------------------------------------------------------ damaged text files


ACTIVATION_SIZES = ["--tokens", "64", "--seqlen", "16", "--calib-tokens", "64", "--eval-tokens", "64",
                    "--eval-seqlen", "16"]
TEXT_OPTIONS = [  # (command, the option naming a text file, what else makes the command read it)
    ("prune", "--calib-text", ["--method", "wanda", "--no-eval", "--calib-samples", "2", "--calib-seqlen", "16"]),
    ("prune", "--eval-text", ["--method", "magnitude", "--eval-tokens", "32", "--eval-seqlen", "16"]),
    ("shrink", "--calib-text", ["--no-eval", "--latency-rounds", "0", "--calib-samples", "2", "--calib-seqlen", "16",
                                "--multiple-of", "8"]),
    ("shrink", "--eval-text", ["--criterion", "magnitude", "--compensation", "none", "--latency-rounds", "0",
                               "--eval-tokens", "32", "--eval-seqlen", "16", "--multiple-of", "8"]),
    ("activations", "--text", ["--tokens", "64", "--seqlen", "16"]),
    ("activations", "--calib-text", [*ACTIVATION_SIZES, "--threshold", "0.5"]),
    ("activations", "--eval-text", [*ACTIVATION_SIZES, "--swap", "relu"]),
]


def _damaged_text(kind: str, path: Path) -> Path:
    path.write_bytes({"empty": b"", "blank": b" \n\n\t \n", "binary": bytes(range(256)) * 8,
                      "nul": b"text\x00\x01\x02 with NUL bytes"}[kind])
    return path


TEXT_MESSAGES = {"empty": "is empty", "blank": "is empty", "binary": "is not UTF-8 text", "nul": "looks binary"}


@pytest.mark.parametrize("kind", sorted(TEXT_MESSAGES))
@pytest.mark.parametrize(("command", "option", "extra"), TEXT_OPTIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_a_binary_or_empty_text_file_is_one_line(command, option, extra, kind, inputs, tmp_path, capsys, stderr_logs):
    bad = _damaged_text(kind, tmp_path / "bad.txt")
    out = tmp_path / "out"
    good = ["--calib-text", "--eval-text"] + (["--text"] if command == "activations" else [])
    argv = [command, str(inputs["model"])] + [x for o in good if o != option for x in (o, str(inputs["text"]))]
    rc, lines = run_cli([*argv, option, str(bad), *extra, "--out", str(out)], capsys)
    assert_one_line(rc, lines, command, str(bad), TEXT_MESSAGES[kind], "expected")
    assert_no_output(out)


@pytest.mark.parametrize("kind", ["empty", "binary"])
def test_the_study_text_too(kind, tmp_path, capsys, stderr_logs):
    bad = _damaged_text(kind, tmp_path / "bad.txt")
    rc, lines = run_cli(["activations", "study", "--study-text", str(bad), "--steps", "2", "--seeds", "0",
                         "--out", str(tmp_path / "out")], capsys)
    assert_one_line(rc, lines, "activations", str(bad), TEXT_MESSAGES[kind])
    assert_no_output(tmp_path / "out")


def test_a_binary_probe_reference_is_one_line(inputs, tmp_path, capsys, stderr_logs):
    """Found here: a reference file that is not UTF-8 ended in a traceback."""
    bad = _damaged_text("binary", tmp_path / "reference.yaml")
    rc, lines = run_cli(["probe", str(inputs["model"]), "--reference", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert_one_line(rc, lines, "probe", str(bad))
    assert_no_output(tmp_path / "out")


# ------------------------------------------------------------------------------ damaged LoRA adapters


def adapter_ranks_differ(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    key = f"{PREFIX}.0.self_attn.q_proj.lora_"
    folder = hand_adapter(dst, {key + "A.weight": torch.randn(4, 32), key + "B.weight": torch.randn(32, 3)})
    return folder, [str(folder / "adapter_model.safetensors"), "do not multiply", "B must be [out, r] and A [r, in]"]


def adapter_rank_not_config(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    key = f"{PREFIX}.0.self_attn.q_proj.lora_"
    folder = hand_adapter(dst, {key + "A.weight": torch.randn(4, 32), key + "B.weight": torch.randn(32, 4)}, r=8)
    return folder, [str(folder / "adapter_model.safetensors"), repr(key + "A.weight"), "has rank 4",
                    "gives r=8"]


def adapter_truncated(inputs: dict[str, Path], dst: Path) -> tuple[Path, list[str]]:
    folder = _copy(inputs["adapter"], dst)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder, [str(weights), "cannot read adapter weights"]


ADAPTER_DAMAGE = {f.__name__: f for f in (adapter_ranks_differ, adapter_rank_not_config, adapter_truncated)}


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
@pytest.mark.parametrize("subcommand", ["spectrum", "compress"])
def test_a_damaged_adapter_is_one_line_naming_file_and_key(subcommand, damage, inputs, tmp_path, capsys, stderr_logs):
    folder, fragments = ADAPTER_DAMAGE[damage](inputs, tmp_path / "adapter")
    out = tmp_path / "out"
    rc, lines = run_cli(["lora", subcommand, str(folder), "--out", str(out)], capsys)
    assert_one_line(rc, lines, "lora", *fragments)
    assert_no_output(out)


# ------------------------------------------------------------------------------ output locations


def every_command(inputs: dict[str, Path]) -> dict[str, list[str]]:
    """Every subcommand with ``--out``, on good inputs and cheap options (each succeeds as is)."""
    text = str(inputs["text"])
    commands = {c: model_command(c, inputs["model"], inputs) for c in MODEL_COMMANDS}
    commands["prune"] += ["--save"]
    commands["shrink"].remove("--no-save")
    commands["activations study"] = ["activations", "study", "--study-text", text, "--steps", "2", "--seeds", "0",
                                     "--acts", "relu", "--d-model", "16", "--study-batch", "2", "--study-seqlen", "16"]
    commands["lora spectrum"] = ["lora", "spectrum", str(inputs["adapter"])]
    commands["lora compress"] = ["lora", "compress", str(inputs["adapter"])]
    return commands


COMMANDS_WITH_OUT = ("prune", "shrink", "activations", "activations study", "probe", "eval", "edit",
                     "lora spectrum", "lora compress")


@pytest.mark.parametrize("place", ["/proc/forbidden/x", "{file}/x"])
@pytest.mark.parametrize("name", COMMANDS_WITH_OUT)
def test_an_unwritable_output_is_refused_before_any_work(name, place, inputs, tmp_path, capsys, stderr_logs, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    out = place.format(file=tmp_path / "file")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(models, "load", no_work)
    rc, lines = run_cli([*every_command(inputs)[name], "--out", out], capsys)
    command = name.split()[0]
    assert_one_line(rc, lines, command, f"--out {out} cannot be created", "is not a writable folder")


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the atomic writers flush fails as on a full disk, after half of it was written."""
    failed: list[Path] = []

    def full(path: Path) -> None:
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        failed.append(Path(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "fsync_file", full)
    return failed


@pytest.mark.parametrize("name", COMMANDS_WITH_OUT)
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(name, inputs, tmp_path, capsys, stderr_logs, monkeypatch):
    failed = _full_disk(monkeypatch)
    out = tmp_path / "out"
    rc, lines = run_cli(["-q", *every_command(inputs)[name], "--out", str(out)], capsys)
    assert_one_line(rc, lines, name.split()[0], "No space left on device", f"({out}{os.sep}")
    assert ".tmp" not in lines[-1]  # the file the user asked for, not the temporary that was removed
    assert failed and all(not p.exists() for p in failed)  # the half-written temporaries are gone
    assert_no_output(out)


def test_the_commands_succeed_without_the_faults(inputs, tmp_path, capsys):
    """The fault tests above fail for the reason they inject: the same command lines work."""
    for name, argv in every_command(inputs).items():
        out = tmp_path / name.replace(" ", "-")
        rc, lines = run_cli(["-q", *argv, "--out", str(out)], capsys)
        assert rc == 0, (name, lines)
        assert (out / "report.json").is_file() and not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------ Ctrl-C during the save


# Runs prunescope with the writer of the sparse checkpoint's weights wrapped: once the file is
# written (inside the temporary folder, before the index), the process sends itself SIGINT, exactly
# as Ctrl-C would, and waits for it.
_INTERRUPTING = textwrap.dedent("""
    import os, signal, sys, time
    import safetensors.torch

    # a shell's background job starts with SIGINT ignored, and Python then installs no handler:
    # give Ctrl-C its usual meaning whatever started this test
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_save = safetensors.torch.save_file

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        sys.stderr.write("")  # nothing on stderr of its own
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # the KeyboardInterrupt lands here

    safetensors.torch.save_file = save_then_interrupt
    from prunescope.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_ctrl_c_during_the_save_exits_130_and_leaves_no_checkpoint(inputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTING, "-q", "prune", str(inputs["model"]), "--method", "magnitude",
         "--no-eval", "--save", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent.parent,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert lines == ["prunescope prune: interrupted; files being written were removed, finished ones kept"], lines
    assert_no_output(out)  # no checkpoint, finished or not, and no temporary folder
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]
    with pytest.raises(PrunescopeError, match="is not a folder"):
        models.load(out / "model", device="cpu")
