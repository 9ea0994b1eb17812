"""Zero-shot accuracy through lm-eval on a local multiple-choice task, checked against a direct
computation with the model's own forward passes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from prunescope import cli, zeroshot
from prunescope.errors import PrunescopeError
from prunescope.testing import tiny_llama

DATA = Path(__file__).parent / "data" / "zeroshot"
TASK = "prunescope_facts"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task's YAML with an absolute path to its JSONL: datasets.load_dataset resolves a
    relative ``data_files`` against the working directory, not the YAML's folder."""
    folder = tmp_path_factory.mktemp("tasks")
    text = (DATA / f"{TASK}.yaml").read_text()
    (folder / f"{TASK}.yaml").write_text(text.replace("test: facts.jsonl", f"test: {DATA / 'facts.jsonl'}"))
    return folder


def _missing_task_dir(tmp_path: Path) -> Path:
    """A folder with task ``prunescope_missing``, whose data file does not exist (as a Hub dataset
    does not, offline)."""
    folder = tmp_path / "missing-task"
    folder.mkdir()
    (folder / "missing.yaml").write_text(
        (DATA / f"{TASK}.yaml").read_text()
        .replace(f"task: {TASK}", "task: prunescope_missing")
        .replace("test: facts.jsonl", f"test: {tmp_path / 'absent.jsonl'}")
    )
    return folder


def _items() -> list[dict]:
    return [json.loads(line) for line in (DATA / "facts.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def _choice_loglikelihood(model, tokenizer, question: str, choice: str) -> float:
    """Sum of log P(token | everything before it) over the tokens of " choice" after the question."""
    context = tokenizer(question, add_special_tokens=False).input_ids
    whole = tokenizer(question + " " + choice, add_special_tokens=False).input_ids
    logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)  # (T, vocab)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))


def _reference_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) by direct forward passes: the best choice by log-likelihood, and by
    log-likelihood per character of the choice."""
    hits = hits_norm = 0
    for item in items:
        lls = [_choice_loglikelihood(model, tokenizer, item["question"], c) for c in item["choices"]]
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i]))
        hits += best == item["answer"]
        hits_norm += best_norm == item["answer"]
    return hits / len(items), hits_norm / len(items)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer_):
    return tiny_llama(vocab_size=max(384, len(tiny_tokenizer_)), seed=3), tiny_tokenizer_


def test_accuracy_matches_a_direct_computation(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    scores = zeroshot.accuracy(model, tokenizer, [TASK], include_path=task_dir)
    assert set(scores) == {TASK}
    got = scores[TASK]
    assert set(got) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= got["acc"] <= 1.0 and got["acc_stderr"] > 0
    acc, acc_norm = _reference_accuracy(model, tokenizer, _items())
    assert got["acc"] == pytest.approx(acc)
    assert got["acc_norm"] == pytest.approx(acc_norm)


def test_limit_scores_only_the_first_items(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    scores = zeroshot.accuracy(model, tokenizer, [TASK], limit=7, include_path=task_dir)
    acc, _ = _reference_accuracy(model, tokenizer, _items()[:7])
    assert scores[TASK]["acc"] == pytest.approx(acc)
    assert scores[TASK]["acc"] * 7 == pytest.approx(round(scores[TASK]["acc"] * 7))  # a count out of 7


def test_unknown_task_is_named_with_close_names(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(PrunescopeError, match="unknown lm-eval task 'prunescope_fact'.*prunescope_facts"):
        zeroshot.accuracy(model, tokenizer, ["prunescope_fact"], include_path=task_dir)


def test_a_task_whose_data_cannot_be_reached_is_named(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(PrunescopeError, match="task 'prunescope_missing' could not load its dataset"):
        zeroshot.accuracy(model, tokenizer, ["prunescope_missing"], include_path=_missing_task_dir(tmp_path))


def test_without_lm_eval_says_how_to_install_it(model_and_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    model, tokenizer = model_and_tokenizer
    with pytest.raises(PrunescopeError, match=r"pip install 'prunescope\[eval\]'"):
        zeroshot.accuracy(model, tokenizer, [TASK])


def test_eval_command_writes_the_reports(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--tasks", TASK, "--include-path", str(task_dir),
                     "--limit", "5", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == [TASK] and report["limit"] == 5
    acc = report["scores"][TASK]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 5 == pytest.approx(round(acc * 5))
    assert TASK in (out / "report.md").read_text()


def test_eval_command_refuses_an_unknown_task_before_writing(tiny_model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--tasks", "nope_not_a_task", "--include-path",
                     str(task_dir), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown lm-eval task 'nope_not_a_task'" in err[0]
    assert not out.exists()


def test_prune_reports_accuracy_before_and_after(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "run"
    code = cli.main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                     "--device", "cpu", "--tasks", TASK, "--tasks-include-path", str(task_dir),
                     "--tasks-limit", "6", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["dense_accuracy"][TASK], report["pruned_accuracy"][TASK]
    assert 0.0 <= dense["acc"] <= 1.0 and 0.0 <= pruned["acc"] <= 1.0
    assert "## Zero-shot accuracy (lm-eval)" in (out / "report.md").read_text()


def test_prune_refuses_an_unknown_task_before_writing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["prune", str(tiny_model_dir), "--method", "magnitude", "--no-eval",
                     "--tasks", "prunescope_nope", "--out", str(out)])
    assert code == 2
    assert "unknown lm-eval task 'prunescope_nope'" in capsys.readouterr().err
    assert not out.exists()


def test_eval_command_refuses_unreachable_data_before_writing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["eval", str(tiny_model_dir), "--tasks", "prunescope_missing", "--include-path",
                     str(_missing_task_dir(tmp_path)), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'prunescope_missing' could not load its dataset" in err[0]
    assert not out.exists()


def test_prune_refuses_unreachable_data_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """The task's data are reached while the options are checked, so a missing dataset fails before
    the model is loaded (a model path that does not exist would fail later, not here)."""
    from prunescope import models

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(models, "load", no_load)
    out = tmp_path / "run"
    code = cli.main(["prune", "--method", "magnitude", "--no-eval", "--tasks", "prunescope_missing",
                     "--tasks-include-path", str(_missing_task_dir(tmp_path)), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'prunescope_missing' could not load its dataset" in err[0]
    assert not out.exists()


def test_each_task_dataset_is_built_once_per_process(task_dir, monkeypatch):
    """check -> run -> accuracy all ask whether the data can be reached; only the first builds it."""
    manager = zeroshot.task_manager(task_dir)
    zeroshot._REACHED.pop(manager, None)  # other tests in this process may have reached it already
    calls: list[list[str]] = []
    original = type(manager).load

    def counting_load(self, names):
        calls.append(list(names))
        return original(self, names)

    monkeypatch.setattr(type(manager), "load", counting_load)
    for _ in range(3):
        zeroshot.check_reachable([TASK], manager)
    assert calls == [[TASK]]


def test_limit_and_batch_size_are_checked_with_the_users_flag():
    with pytest.raises(PrunescopeError, match="--tasks-limit must be a positive number"):
        zeroshot.check_counts(0, flag="--tasks-")
    with pytest.raises(PrunescopeError, match="--batch-size must be a positive number"):
        zeroshot.check_counts(None, 0, flag="--")
    zeroshot.check_counts(None)  # nothing given: fine
