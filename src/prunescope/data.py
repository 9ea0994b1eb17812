"""Text sources and token blocks for calibration and evaluation.

Sources (one string, as users type it on the command line):

- ``"default"`` (or ``None``): Python's own ``pydoc_data.topics``, about 465,000 characters of
  English reference prose that ships with every CPython;
- a path to a UTF-8 text file;
- ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset (needs the ``datasets`` package and
  network or a local dataset folder as NAME); the ``text`` column is joined with blank lines.

Blocks are ``LongTensor[n, seqlen]``: random windows for calibration (seeded, reproducible) and
consecutive non-overlapping windows for evaluation (the standard perplexity protocol).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_TEXT = "default"


def default_text() -> str:
    """The bundled default text: every ``pydoc_data.topics`` entry, in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _hf_text(spec: str) -> str:
    """Load ``hf:NAME[:CONFIG][:SPLIT]`` with the ``datasets`` package and join its text column."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1] or len(parts) > 4:
        raise PrunescopeError(
            f"bad dataset spec {spec!r}; expected hf:NAME[:CONFIG][:SPLIT], "
            "e.g. hf:wikitext:wikitext-2-raw-v1:test"
        )
    name = parts[1]
    config = parts[2] if len(parts) > 2 and parts[2] else None
    split = parts[3] if len(parts) > 3 and parts[3] else "train"
    try:
        import datasets
    except ImportError as exc:
        raise PrunescopeError(f"{spec!r} needs the datasets package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
        raise PrunescopeError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): {exc}"
        ) from exc
    if "text" not in ds.column_names:
        raise PrunescopeError(
            f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})"
        )
    return "\n\n".join(t for t in ds["text"] if t)


def load_text(source: str | Path | None = DEFAULT_TEXT) -> str:
    """Return the text named by ``source`` (see the module docstring for the forms)."""
    if source is None or str(source) == DEFAULT_TEXT:
        return default_text()
    text_source = str(source)
    if text_source.startswith("hf:"):
        return _hf_text(text_source)
    path = Path(text_source).expanduser()
    if not path.is_file():
        raise PrunescopeError(
            f"text source {text_source!r} is not a file; pass a UTF-8 text file, "
            f"'{DEFAULT_TEXT}' for the bundled text, or hf:NAME[:CONFIG][:SPLIT]"
        )
    return _read_text_file(path)


def _read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a binary or empty file is one error naming it (it would
    otherwise tokenize to garbage or to nothing, failing later without the file's name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrunescopeError(f"cannot read text file {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrunescopeError(
            f"text file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "expected a UTF-8 text file"
        ) from exc
    if "\x00" in text:
        raise PrunescopeError(
            f"text file {path} looks binary (a NUL byte at character {text.index(chr(0))}); expected a UTF-8 text file"
        )
    if not text.strip():
        raise PrunescopeError(f"text file {path} is empty ({len(data)} bytes, no text); expected UTF-8 text")
    return text


def tokenize(tokenizer: "PreTrainedTokenizerBase", text: str) -> torch.Tensor:
    """Token ids of ``text`` as ``LongTensor[n_tokens]`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_blocks(
    tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens, as ``LongTensor[n_samples, seqlen]``.

    Start positions are drawn uniformly with a seeded generator, as in the Wanda/SparseGPT
    calibration protocol, so the same seed gives the same blocks.

    Raises:
        PrunescopeError: non-positive sizes, or the text holds fewer than
            ``n_samples * seqlen`` tokens.
    """
    if n_samples < 1 or seqlen < 2:
        raise PrunescopeError(
            f"calibration needs n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}"
        )
    n_tokens = tokens.numel()
    if n_tokens < n_samples * seqlen:
        raise PrunescopeError(
            f"calibration text has {n_tokens} tokens, too short for {n_samples} samples of "
            f"{seqlen} tokens ({n_samples * seqlen} needed); use a longer text or fewer samples"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen + 1, (n_samples,), generator=gen)  # [n]
    offsets = torch.arange(seqlen)  # [seqlen]
    return tokens[starts[:, None] + offsets[None, :]]  # [n, seqlen]


def eval_blocks(
    tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows: ``LongTensor[n_tokens // seqlen, seqlen]``.

    The first ``max_tokens`` tokens are used (all when ``None``); a trailing partial window is
    dropped, as in the standard protocol.

    Raises:
        PrunescopeError: bad sizes, or fewer tokens than one window.
    """
    if seqlen < 2:
        raise PrunescopeError(f"evaluation seqlen must be >= 2, got {seqlen}")
    if max_tokens is not None and max_tokens < seqlen:
        raise PrunescopeError(
            f"eval tokens ({max_tokens}) must be at least one window of {seqlen} tokens"
        )
    used = tokens[:max_tokens] if max_tokens is not None else tokens
    n_blocks = used.numel() // seqlen
    if n_blocks == 0:
        raise PrunescopeError(
            f"evaluation text has {used.numel()} tokens, fewer than one window of {seqlen}"
        )
    if max_tokens is not None and used.numel() < max_tokens:
        log.warning("evaluation text has only %d tokens (asked for %d)", used.numel(), max_tokens)
    return used[: n_blocks * seqlen].view(n_blocks, seqlen)


@dataclass(frozen=True)
class TextOptions:
    """Calibration and evaluation text options shared by every job that prunes and measures.

    Calibration: ``calib_samples`` random windows of ``calib_seqlen`` tokens of ``calib_text``
    (seeded by ``seed``), run ``calib_batch_size`` windows at a time. Evaluation: perplexity on
    the first ``eval_tokens`` tokens (all when None) of ``eval_text`` in ``eval_seqlen``-token
    windows, unless ``evaluate`` is False.
    """

    calib_text: str = DEFAULT_TEXT
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_batch_size: int = 8
    eval_text: str = DEFAULT_TEXT
    eval_tokens: int | None = 16384
    eval_seqlen: int = 512
    eval_batch_size: int = 4
    evaluate: bool = True
    seed: int = 0

    def check_text_options(self) -> None:
        """Validate the sizes; raises PrunescopeError naming the bad option."""
        if self.calib_samples < 1 or self.calib_seqlen < 2 or self.calib_batch_size < 1:
            raise PrunescopeError(
                f"calibration needs samples >= 1, seqlen >= 2 and batch size >= 1, got "
                f"{self.calib_samples}, {self.calib_seqlen} and {self.calib_batch_size}"
            )
        if self.eval_seqlen < 2:
            raise PrunescopeError(f"eval seqlen must be >= 2, got {self.eval_seqlen}")
        if self.eval_tokens is not None and self.eval_tokens < self.eval_seqlen:
            raise PrunescopeError(
                f"eval tokens ({self.eval_tokens}) must be at least eval seqlen ({self.eval_seqlen})"
            )
        if self.eval_batch_size < 1:
            raise PrunescopeError(f"eval batch size must be >= 1, got {self.eval_batch_size}")

    def calibration_windows(self, tokenizer: "PreTrainedTokenizerBase") -> torch.Tensor:
        """``LongTensor[calib_samples, calib_seqlen]`` of the calibration text."""
        tokens = tokenize(tokenizer, load_text(self.calib_text))
        return calibration_blocks(tokens, self.calib_samples, self.calib_seqlen, self.seed)

    def evaluation_windows(self, tokenizer: "PreTrainedTokenizerBase") -> torch.Tensor | None:
        """``LongTensor[n, eval_seqlen]`` of the evaluation text, or None without evaluation."""
        if not self.evaluate:
            return None
        tokens = tokenize(tokenizer, load_text(self.eval_text))
        return eval_blocks(tokens, self.eval_seqlen, self.eval_tokens)
