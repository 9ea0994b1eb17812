"""Model quality and cost: perplexity (standard protocol), parameter bytes, forward latency,
prefill time and decode speed measured side by side."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunescope import devices, distributed, models

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity over ``blocks`` (``LongTensor[n, seqlen]``, non-overlapping windows).

    Each window is scored independently; the result is ``exp`` of the mean next-token negative
    log-likelihood over all predicted tokens (``n * (seqlen - 1)``), which equals the usual
    ``exp(mean of per-window mean NLL)`` since all windows have the same length. Launched in
    several processes, each scores its share of the windows and the sums are added up.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be LongTensor[n, seqlen] with n >= 1, got {tuple(blocks.shape)}")
    blocks = distributed.shard(blocks, "evaluation windows")
    device = models.input_device(model)
    total_nll, total_tokens = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)  # [b, L]
        logits = model(input_ids=batch, use_cache=False).logits  # [b, L, V]
        total_nll += next_token_nll(logits, batch)
        total_tokens += batch[:, 1:].numel()
    total_nll, total_tokens = distributed.sum_numbers(total_nll, total_tokens)
    return math.exp(total_nll / total_tokens)


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``batch[:, 1:]`` (``[b, L]``) under ``logits``
    (``[b, L, V]``): computed in float32 whatever the model's dtype, summed in float64."""
    nll = F.cross_entropy(  # [b * (L - 1)]
        logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
    )
    return nll.double().sum().item()


def perplexity_or_none(
    model: nn.Module, blocks: torch.Tensor | None, batch_size: int = 4, desc: str = "perplexity"
) -> float | None:
    """:func:`perplexity` on ``blocks``, or None when there are none (evaluation turned off)."""
    return None if blocks is None else perplexity(model, blocks, batch_size=batch_size, desc=desc)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (masks included), shared storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_meta:  # an offloaded model's weights: what they will take, once per tensor
            key, size = ("meta", id(tensor)), tensor.numel() * tensor.element_size()
        else:
            key, size = ("real", tensor.untyped_storage().data_ptr()), tensor.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


@torch.no_grad()
def forward_latency(
    model: nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1
) -> float:
    """Median wall-clock seconds of one forward pass on ``input_ids`` (``LongTensor[b, L]``)."""
    for _ in range(warmup):
        model(input_ids=input_ids)
    times = []
    for _ in range(repeats):
        devices.synchronize(input_ids.device)
        start = time.perf_counter()
        model(input_ids=input_ids)
        devices.synchronize(input_ids.device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def prefill_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Wall-clock seconds of one prefill: a forward over ``input_ids`` (``[b, L]``) building the KV cache."""
    devices.synchronize(input_ids.device)
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=True)
    devices.synchronize(input_ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Wall-clock seconds of greedy generation of exactly ``new_tokens`` tokens after ``prompt``
    (``[1, L]``) with the KV cache, as ``generate`` does it for a user."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    devices.synchronize(prompt.device)
    start = time.perf_counter()
    model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        pad_token_id=pad if pad is not None else 0,
    )
    devices.synchronize(prompt.device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Latency:
    """Medians over interleaved rounds for one model.

    Attributes:
        prefill_seconds: one prefill of ``prefill_tokens`` tokens (batch 1).
        decode_tokens_per_second: batch-1 greedy decode with the KV cache.
        prefill_all / decode_all: every round's figure, in order.
    """

    prefill_seconds: float
    decode_tokens_per_second: float
    prefill_all: tuple[float, ...]
    decode_all: tuple[float, ...]


def compare_latency(
    models_by_name: Mapping[str, nn.Module],
    vocab_size: int,
    prefill_tokens: int = 512,
    decode_tokens: int = 64,
    rounds: int = 3,
    prompt_tokens: int = 8,
    seed: int = 0,
) -> dict[str, Latency]:
    """CPU/GPU latency of several models measured side by side: rounds interleave the models so
    that machine noise hits them alike; one warm-up call each first.

    Prefill runs ``prefill_tokens`` random token ids; decode generates ``decode_tokens`` after a
    ``prompt_tokens`` prompt. Returns name -> :class:`Latency` (medians).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prefill_tokens), generator=gen)  # [1, L]
    prefill: dict[str, list[float]] = {name: [] for name in models_by_name}
    decode: dict[str, list[float]] = {name: [] for name in models_by_name}
    for name, model in models_by_name.items():  # warm-up
        device = next(model.parameters()).device
        prefill_seconds(model, ids[:, :16].to(device))
        decode_seconds(model, ids[:, :prompt_tokens].to(device), 2)
    for _ in tqdm(range(rounds), desc="latency", unit="round", leave=False):
        for name, model in models_by_name.items():
            device = next(model.parameters()).device
            prefill[name].append(prefill_seconds(model, ids.to(device)))
            seconds = decode_seconds(model, ids[:, :prompt_tokens].to(device), decode_tokens)
            decode[name].append(decode_tokens / seconds)
    return {
        name: Latency(statistics.median(prefill[name]), statistics.median(decode[name]),
                      tuple(prefill[name]), tuple(decode[name]))
        for name in models_by_name
    }
