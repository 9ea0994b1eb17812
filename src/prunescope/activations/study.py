"""ReLU vs GELU vs SiLU vs Mish, measured: train the same tiny character-level transformer with
each activation (same data, same schedule, several seeds) and compare validation loss,
activation sparsity, dead neurons and time per step.

The model is a small pre-LayerNorm decoder (learned positions, causal attention through
``scaled_dot_product_attention``, an MLP ``Linear(d, 4d) -> act -> Linear(4d, d)``). Data is
fixed: the text is split 90/10 into train/validation, training windows are drawn by a generator
with a fixed data seed, so runs differ only in the activation and the initialisation seed.
Sparsity and dead neurons are measured with the profiler (:mod:`.profiler`) on the validation text.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunescope import data
from prunescope.activations.profiler import profile
from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

STUDY_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish}


@dataclass(frozen=True)
class StudyConfig:
    """The study's options; validated here."""

    text: str = data.DEFAULT_TEXT
    activations: tuple[str, ...] = ("relu", "gelu", "silu", "mish")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    batch: int = 32
    seqlen: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 3e-3
    eval_windows: int = 64
    data_seed: int = 1234

    def __post_init__(self) -> None:
        bad = [a for a in self.activations if a not in STUDY_ACTS]
        if bad or not self.activations:
            raise PrunescopeError(f"unknown study activation(s) {bad}; choose from {', '.join(STUDY_ACTS)}")
        if not self.seeds:
            raise PrunescopeError("the study needs at least one seed")
        if min(self.steps, self.batch, self.d_model, self.n_layers, self.n_heads, self.eval_windows) < 1 or self.seqlen < 2:
            raise PrunescopeError("steps, batch, d_model, layers, heads and eval windows must be >= 1, seqlen >= 2")
        if self.d_model % self.n_heads:
            raise PrunescopeError(f"d_model ({self.d_model}) must be a multiple of heads ({self.n_heads})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PrunescopeError(f"learning rate must be positive, got {self.lr}")


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc_in, self.act, self.fc_out = nn.Linear(d, 4 * d), act(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)  # each [b, t, h, dh]
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))  # [b, t, d]
        return x + self.fc_out(self.act(self.fc_in(self.ln2(x))))


class CharTransformer(nn.Module):
    """A tiny character-level decoder; ``forward(input_ids)`` returns logits ``[b, t, vocab]``."""

    def __init__(self, vocab: int, seqlen: int, d: int, layers: int, heads: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seqlen, d)
        self.blocks = nn.ModuleList(_Block(d, heads, act) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))  # [b, t, d]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclass(frozen=True)
class StudyRun:
    """One trained network: activation, seed and what it measured."""

    activation: str
    seed: int
    train_loss: float  # mean of the last 10% of steps
    val_loss: float
    zero_frac: float  # exact zeros of the activation outputs on validation text
    near_zero_frac: float  # |x| < 0.1 rms
    dead_frac: float  # neurons never above zero on validation text
    dead_eps_frac: float  # neurons never outside |x| < 0.01 rms
    step_ms: float  # median wall-clock per training step
    loss_curve: tuple[float, ...]  # training loss, mean per 5% of steps


@dataclass(frozen=True)
class StudySummary:
    """Mean and standard deviation over seeds for one activation."""

    activation: str
    val_loss: float
    val_loss_std: float
    zero_frac: float
    near_zero_frac: float
    dead_frac: float
    step_ms: float
    step_ms_std: float


@dataclass(frozen=True)
class StudyResult:
    """The canonical content of the study's ``report.json``."""

    config: StudyConfig
    vocab: int
    train_chars: int
    val_chars: int
    threads: int
    runs: tuple[StudyRun, ...]
    summary: tuple[StudySummary, ...]


def encode(text: str) -> tuple[torch.Tensor, int]:
    """Characters to ids (sorted alphabet): ``(LongTensor[len], vocab size)``."""
    alphabet = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([alphabet[c] for c in text], dtype=torch.long), len(alphabet)


def _batches(train: torch.Tensor, config: StudyConfig) -> torch.Tensor:
    """All training windows, fixed by the data seed: ``[steps, batch, seqlen + 1]``."""
    gen = torch.Generator().manual_seed(config.data_seed)
    starts = torch.randint(0, train.numel() - config.seqlen - 1, (config.steps, config.batch), generator=gen)
    return train[starts[..., None] + torch.arange(config.seqlen + 1)]


def _lr(step: int, config: StudyConfig) -> float:
    warm = max(1, config.steps // 20)
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, config.steps - warm)))


@torch.no_grad()
def _val_loss(model: nn.Module, val_blocks: torch.Tensor) -> float:
    logits = model(val_blocks[:, :-1])  # [n, t, V]
    return float(F.cross_entropy(logits.flatten(0, 1), val_blocks[:, 1:].flatten()))


def train_one(act: str, seed: int, config: StudyConfig, vocab: int, batches: torch.Tensor,
              val_blocks: torch.Tensor) -> StudyRun:
    """Train one network and measure it."""
    torch.manual_seed(seed)
    model = CharTransformer(vocab, config.seqlen, config.d_model, config.n_layers, config.n_heads, STUDY_ACTS[act])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    losses, times = [], []
    for step in tqdm(range(config.steps), desc=f"{act} seed {seed}", leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr(step, config)
        batch = batches[step]  # [batch, seqlen + 1]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):  # the weights are NaN/inf from here on: nothing to measure
            raise PrunescopeError(
                f"the {act} network (seed {seed}) diverged at step {step + 1} (training loss {losses[-1]}); "
                f"lower --lr (now {config.lr:g})"
            )
    model.eval()
    prof = profile(model, val_blocks[:, :-1], eps=(0.01, 0.1), token_eps=0.1, sample_every=1,
                   batch_size=val_blocks.shape[0], progress=False)
    acts = prof.activation_sites()
    width = sum(s.width for s in acts)
    chunk = max(1, config.steps // 20)
    return StudyRun(
        activation=act, seed=seed, train_loss=statistics.fmean(losses[-max(1, config.steps // 10):]),
        val_loss=_val_loss(model, val_blocks),
        zero_frac=statistics.fmean(s.zero_frac for s in acts),
        near_zero_frac=statistics.fmean(s.near_zero_frac["0.1"] for s in acts),
        dead_frac=sum(s.dead_neurons for s in acts) / width,
        dead_eps_frac=sum(s.dead_neurons_eps for s in acts) / width,
        step_ms=1000 * statistics.median(times[min(10, len(times) - 1):]),
        loss_curve=tuple(statistics.fmean(losses[i : i + chunk]) for i in range(0, len(losses), chunk)),
    )


def _summarise(runs: list[StudyRun], acts: tuple[str, ...]) -> tuple[StudySummary, ...]:
    out = []
    for act in acts:
        rs = [r for r in runs if r.activation == act]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append(StudySummary(
            act, statistics.fmean(r.val_loss for r in rs), sd([r.val_loss for r in rs]),
            statistics.fmean(r.zero_frac for r in rs), statistics.fmean(r.near_zero_frac for r in rs),
            statistics.fmean(r.dead_frac for r in rs), statistics.fmean(r.step_ms for r in rs),
            sd([r.step_ms for r in rs])))
    return tuple(out)


def run_study(config: StudyConfig) -> StudyResult:
    """Train every activation x seed (seeds interleaved, so machine noise spreads over all)."""
    ids, vocab = encode(data.load_text(config.text))
    split = int(0.9 * ids.numel())
    train, val = ids[:split], ids[split:]
    need = config.eval_windows * (config.seqlen + 1)
    if val.numel() < need or train.numel() < 2 * (config.seqlen + 1):
        raise PrunescopeError(
            f"study text has {ids.numel()} characters; the validation tenth ({val.numel()}) must hold "
            f"{config.eval_windows} windows of {config.seqlen + 1} ({need}): use a longer text or fewer windows")
    val_blocks = val[:need].view(config.eval_windows, config.seqlen + 1)
    batches = _batches(train, config)
    runs = [train_one(act, seed, config, vocab, batches, val_blocks) for seed in config.seeds for act in config.activations]
    for r in runs:
        log.info("%s seed %d: val loss %.4f, zeros %.1f%%, dead %.1f%%, %.1f ms/step", r.activation, r.seed,
                 r.val_loss, 100 * r.zero_frac, 100 * r.dead_frac, r.step_ms)
    return StudyResult(config, vocab, train.numel(), val.numel(), torch.get_num_threads(), tuple(runs),
                       _summarise(runs, config.activations))
