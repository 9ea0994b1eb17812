"""Model quality and cost: perplexity (standard protocol), parameter bytes, forward latency."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
    ``exp(mean of per-window mean NLL)`` since all windows have the same length.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be LongTensor[n, seqlen] with n >= 1, got {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)  # [b, L]
        logits = model(input_ids=batch, use_cache=False).logits  # [b, L, V]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (masks included), shared storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
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
        start = time.perf_counter()
        model(input_ids=input_ids)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
