"""Shared fixtures: tiny random models built in the tests (no downloads), and the real bundled
model for the few tests marked ``integration``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunescope.testing import save_tiny_model, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Keep each test on few threads: CI has 2 cores and tiny tensors gain nothing from more."""
    torch.set_num_threads(2)


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
def bundled():
    """The real bundled SmolLM2-135M (model, tokenizer); converted once and cached."""
    from prunescope import models

    return models.load(models.DEFAULT_MODEL)
