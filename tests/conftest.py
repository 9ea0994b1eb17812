"""Shared fixtures: tiny random models built in the tests (no downloads), and the real bundled
model for the few tests marked ``integration``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunescope.testing import digit_tokenizer, save_tiny_model, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest):
    """One torch thread for unit tests, two for ``integration`` tests; restored afterwards.

    Unit tests use tiny tensors, where a second thread only adds synchronisation (on a busy
    2-core machine a 32x32 matmul took ~8 ms with two threads against ~20 us with one); the real
    bundled model does gain from both cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.get_closest_marker("integration") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer_():
    return tiny_tokenizer()


@pytest.fixture()
def tiny_model():
    """A fresh tiny random Llama (2 layers, hidden 32), safe to mutate."""
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and tokenizer saved as an HF folder (read-only by convention)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small text file (the first 20,000 characters of the default text, a few thousand
    tokens) so tests do not tokenize the whole default text."""
    from prunescope.data import default_text

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(default_text()[:20_000])
    return str(path)


@pytest.fixture(scope="session")
def quick_prune(tiny_model_dir: Path, text_file: str):
    """``quick_prune(out, *argv) -> exit code``: ``prunescope prune`` on the tiny model with a few
    short calibration and evaluation windows of ``text_file``."""
    from prunescope import cli

    def run(out: Path, *argv: str) -> int:
        return cli.main(["prune", str(tiny_model_dir), "--calib-text", text_file, "--calib-samples", "4",
                         "--calib-seqlen", "16", "--eval-text", text_file, "--eval-tokens", "64", "--eval-seqlen",
                         "16", "--out", str(out), *argv])

    return run


@pytest.fixture(scope="session")
def dtok():
    """The tiny tokenizer writing each digit as its own token (probe and edit tests)."""
    return digit_tokenizer()


@pytest.fixture(scope="session")
def digit_model_dir(tmp_path_factory: pytest.TempPathFactory, dtok) -> Path:
    """A tiny random Llama with the digit tokenizer saved as an HF folder (read-only by convention)."""
    folder = tmp_path_factory.mktemp("tiny-digits")
    tiny_llama(vocab_size=max(384, len(dtok))).save_pretrained(folder)
    dtok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bundled():
    """The real bundled SmolLM2-135M (model, tokenizer); converted once and cached."""
    from prunescope import models

    return models.load(models.DEFAULT_MODEL)
