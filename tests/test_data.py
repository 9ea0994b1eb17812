import pytest
import torch

from prunescope import data
from prunescope.errors import PrunescopeError


def test_default_text_is_pydoc_topics():
    text = data.load_text("default")
    assert len(text) > 400_000
    assert "The ``if`` statement" in text or "if_stmt" in text or "if" in text


def test_text_file_and_missing_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world", encoding="utf-8")
    assert data.load_text(str(f)) == "hello world"
    with pytest.raises(PrunescopeError, match="not a file"):
        data.load_text(str(tmp_path / "missing.txt"))


def test_hf_dataset_from_local_folder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n')
    assert data.load_text(f"hf:{tmp_path / 'ds'}") == "a b\n\nc d"
    with pytest.raises(PrunescopeError, match="bad dataset spec"):
        data.load_text("hf:")


def test_calibration_blocks_deterministic_and_windows():
    tokens = torch.arange(1000)
    a = data.calibration_blocks(tokens, 8, 16, seed=3)
    b = data.calibration_blocks(tokens, 8, 16, seed=3)
    c = data.calibration_blocks(tokens, 8, 16, seed=4)
    assert a.shape == (8, 16) and torch.equal(a, b) and not torch.equal(a, c)
    # each row is a contiguous window of the token stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 15, dtype=torch.long))


def test_calibration_too_short():
    with pytest.raises(PrunescopeError, match="too short"):
        data.calibration_blocks(torch.arange(100), 8, 16)


def test_eval_blocks_non_overlapping():
    tokens = torch.arange(100)
    blocks = data.eval_blocks(tokens, 16, max_tokens=50)
    assert blocks.shape == (3, 16)
    assert torch.equal(blocks.flatten(), torch.arange(48))
    with pytest.raises(PrunescopeError, match="fewer than one window"):
        data.eval_blocks(torch.arange(10), 16)
