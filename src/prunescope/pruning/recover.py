"""Recovery after shrinking: a short distillation toward the dense model's next-token distributions.

The loss is ``KL(p_dense || p_shrunk)`` of the next-token distributions, averaged over every
position of the calibration windows (the teacher's full distribution, not only its argmax).

Two modes:

- ``lora``: a rank-``r`` adapter ``W + s B A`` (``A`` random, ``B`` zero, ``s = 2``) on every
  projection inside the decoder layers; only the adapters train, then they are merged into the
  weights, so the saved model is plain (no PEFT needed to load it);
- ``full``: every parameter of the decoder layers trains (embeddings, head and final norm stay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunescope import families, models
from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}
LORA_SCALE = 2.0


@dataclass(frozen=True)
class RecoveryResult:
    """How the distillation went.

    Attributes:
        mode: ``lora`` or ``full``.
        steps / batch_size / seqlen: the schedule (one batch of windows per step).
        lr / rank: the optimiser's learning rate and the LoRA rank (None for full).
        trainable_params: parameters that trained.
        losses: the KL loss at every step (nats per token).
        seconds: wall-clock time of the distillation.
    """

    mode: str
    steps: int
    batch_size: int
    seqlen: int
    lr: float
    rank: int | None
    trainable_params: int
    losses: tuple[float, ...]
    seconds: float


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(teacher) || softmax(student))`` (``[b, L, V]`` each)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)  # [b*L, V]
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (or GPT-2 Conv1D) inside the decoder layers, by name."""
    layers = models.adapter_for(model).layers(model)
    return {
        name: m for name, m in layers.named_modules()
        if isinstance(m, nn.Linear) or families.is_conv1d(m)
    }


@contextmanager
def _lora(model: nn.Module, rank: int, seed: int) -> Iterator[list[torch.Tensor]]:
    """Attach rank-``rank`` adapters to every projection (forward hooks); merge them on exit."""
    gen = torch.Generator().manual_seed(seed)
    adapters: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = []
    for module in _projections(model).values():
        w = families.weight_matrix(module)  # [out, in]
        a = (torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5).to(w.device)
        b = torch.zeros(w.shape[0], rank, device=w.device)
        a.requires_grad_(True)
        b.requires_grad_(True)
        adapters.append((module, a, b))

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, a=a, b=b) -> torch.Tensor:
            x = args[0].to(a.dtype)
            return out + (LORA_SCALE * (x @ a.T) @ b.T).to(out.dtype)  # [..., out]

        handles.append(module.register_forward_hook(hook))
    try:
        yield [t for _, a, b in adapters for t in (a, b)]
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():  # merged in float32, then rounded once to the weights' dtype
            for module, a, b in adapters:
                w = families.weight_matrix(module)  # [out, in] view
                w.copy_((w.float() + LORA_SCALE * b.float() @ a.float()).to(w.dtype))


@contextmanager
def _trainable(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Only ``params`` require grad inside the block; the previous flags are restored after."""
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


def _train(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int,
    params: list[torch.Tensor], lr: float, desc: str,
) -> list[float]:
    """AdamW on ``params`` with the KL loss, one batch of windows per step; returns the losses."""
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="step", leave=False)
    for start in bar:
        batch = windows[start : start + batch_size].to(device)  # [b, L]
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits  # [b, L, V]
        loss = kl_loss(target, student(input_ids=batch, use_cache=False).logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    return losses


def distill(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    mode: str = "lora",
    lr: float | None = None,
    rank: int = 8,
    seed: int = 0,
) -> RecoveryResult:
    """Train ``student`` in place toward ``teacher`` on ``windows`` (``LongTensor[n, L]``).

    One step per ``batch_size`` windows. ``lr`` defaults to 5e-4 (lora) or 2e-5 (full). The
    student ends in eval mode with any adapters merged.
    """
    if mode not in DEFAULT_LR:
        raise ValueError(f"unknown recovery mode {mode!r}; choose one of {', '.join(DEFAULT_LR)}")
    lr = DEFAULT_LR[mode] if lr is None else lr
    teacher.eval()
    student.eval()  # no dropout: the shrunk model is trained as it is used
    t0 = time.perf_counter()
    if mode == "lora":
        with _lora(student, rank, seed) as params, _trainable(student, params):
            trainable = sum(p.numel() for p in params)
            losses = _train(student, teacher, windows, batch_size, params, lr, f"recover (lora r={rank})")
    else:
        params = list(models.adapter_for(student).layers(student).parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise PrunescopeError(
                "full recovery trains the weights in place and needs float32 weights (AdamW steps "
                "vanish in bfloat16/float16); use LoRA recovery, whose adapters train in float32"
            )
        trainable = sum(p.numel() for p in params)
        with _trainable(student, params):
            losses = _train(student, teacher, windows, batch_size, params, lr, "recover (full)")
    seconds = time.perf_counter() - t0
    log.info("recovery (%s): KL %.4f -> %.4f over %d steps in %.1f s", mode, losses[0], losses[-1], len(losses), seconds)
    return RecoveryResult(mode, len(losses), batch_size, windows.shape[1], lr,
                          rank if mode == "lora" else None, trainable, tuple(losses), seconds)
