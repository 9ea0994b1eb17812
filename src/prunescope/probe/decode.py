"""A batch of sequences decoded together with one KV cache, where each sequence may pause.

Cells of a table have different token lengths across the batch, so a sequence that has finished
its cell feeds a masked pad token while the others continue. Every sequence keeps its own position
counter (``position_ids``) and a 2-D attention mask over the whole cache, so a pause leaves no
trace in what the sequence computes: its logits equal those of an unbatched, unpadded run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunescope import models


@dataclass
class Batch:
    """Decoding state of ``B`` sequences sharing one cache.

    Attributes:
        model: the causal LM (eval mode).
        cache: the transformers ``DynamicCache`` holding keys/values of every fed token.
        mask: (B, T) 1 where the cached token is real for that sequence, 0 for pauses.
        pos: (B,) next position id of each sequence (count of real tokens fed).
        logits: (B, V) float32 next-token logits after each sequence's last real token.
        pad_id: token fed to paused sequences (masked out, never attended to).
        tokens_fed: token positions run through the model so far, pads and peeks included
            (the compute budget of this batch).
        history: per sequence, the real tokens fed so far (prompt included; no pads, no peeks):
            the text each sequence has written, so a cell's context can be replayed later
            (``prunescope edit`` fits on these contexts).
    """

    model: nn.Module
    cache: object
    mask: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor
    pad_id: int
    tokens_fed: int = 0
    history: list[list[int]] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def start(cls, model: nn.Module, prompt_ids: list[int], batch_size: int, pad_id: int) -> "Batch":
        """Run the shared prompt once (batch 1) and repeat its cache ``batch_size`` times."""
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = torch.tensor([prompt_ids], device=_device(model))  # (1, L)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(batch_size)
        n = len(prompt_ids)
        return cls(
            model=model,
            cache=cache,
            mask=torch.ones(batch_size, n, dtype=torch.long),
            pos=torch.full((batch_size,), n, dtype=torch.long),
            logits=out.logits[0, -1].float().cpu().expand(batch_size, -1).clone(),
            pad_id=pad_id,
            tokens_fed=n,
            history=[list(prompt_ids) for _ in range(batch_size)],
        )

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``ids`` (B, L) for active sequences (pads for the others); return (B, L, V) logits.

        The logits of paused sequences are garbage and ``self.logits`` keeps their old value.
        """
        b, length = ids.shape
        active = torch.ones(b, dtype=torch.bool) if active is None else active
        ids = torch.where(active[:, None], ids, torch.full_like(ids, self.pad_id))
        new_mask = active[:, None].long().expand(b, length)  # (B, L)
        positions = self.pos[:, None] + torch.arange(length)[None, :]  # (B, L)
        self.mask = torch.cat([self.mask, new_mask], dim=1)  # (B, T+L)
        self.tokens_fed += b * length
        device = _device(self.model)  # bookkeeping stays on the CPU; only the forward moves
        out = self.model(
            input_ids=ids.to(device), attention_mask=self.mask.to(device), position_ids=positions.to(device),
            cache=self.cache, use_cache=True,
        )
        logits = out.logits.float().cpu()  # (B, L, V)
        self.pos = self.pos + active.long() * length
        for i in torch.nonzero(active)[:, 0].tolist():
            self.history[i].extend(ids[i].tolist())
        self.logits = torch.where(active[:, None], logits[:, -1], self.logits)
        return logits

    @torch.no_grad()
    def peek(self, ids: list[int]) -> torch.Tensor:
        """Log-probability (B,) of every sequence continuing with the tokens ``ids``; state unchanged.

        The first token is scored from the current logits; the rest by a temporary forward of
        ``ids[:-1]`` that is cropped from the cache afterwards.
        """
        return self._score(ids, feed_last=False)[0]

    @torch.no_grad()
    def look(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability (B,) of continuing with ``ids`` and the (B, V) logits after them.

        Like :meth:`peek` but the temporary forward includes the last token, so the next-token
        distribution after ``ids`` can be read (e.g. how likely the cell ends there).
        """
        return self._score(ids, feed_last=True)

    def _score(self, ids: list[int], feed_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Score ``ids`` by a temporary forward that is cropped from the cache afterwards."""
        logp = torch.log_softmax(self.logits, dim=-1)[:, ids[0]]  # (B,)
        fed = ids if feed_last else ids[:-1]
        if not fed:
            return logp, self.logits
        saved = (self.mask, self.pos, self.logits)
        logits = self.feed(torch.tensor(fed).expand(self.size, -1))  # (B, L, V)
        for ids_i in self.history:
            del ids_i[-len(fed):]  # a peek leaves no trace in what the sequences wrote
        if len(ids) > 1:
            step = torch.log_softmax(logits[:, : len(ids) - 1], dim=-1)  # (B, len(ids)-1, V)
            target = torch.tensor(ids[1:]).expand(self.size, -1)  # (B, len(ids)-1)
            logp = logp + step.gather(-1, target[..., None])[..., 0].sum(dim=1)
        after = logits[:, -1]  # (B, V)
        self.cache.crop(-len(fed))  # negative: remove that many tokens
        self.mask, self.pos, self.logits = saved
        return logp, after


def _device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (its first parameter's device)."""
    return models.input_device(model)
