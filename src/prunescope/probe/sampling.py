"""How the N tables of a batch draw their tokens: independently, or as one low-discrepancy set.

Both samplers give every table an exact sample from the model: at each step, table ``k`` takes
the token ``F_k^{-1}(u_k)`` (inverse CDF of its own next-token distribution) with ``u_k`` uniform on
[0, 1) given everything drawn before. They differ in how the ``u_k`` of one step relate:

- ``iid``: independent (``torch.multinomial``). Counting samples then gives binomial counts, which
  is what Wilson intervals assume.
- ``rqmc``: sorted randomised quasi-Monte Carlo (array-RQMC, L'Ecuyer et al. 2008). The tables are
  sorted by the tokens they have drawn so far (lexicographically, so tables with the same history
  are neighbours) and the table at sorted position ``j`` gets ``u = frac(j * g / B + shift)``: a
  rank-1 lattice whose B points are exactly {0, 1/B, ..., (B-1)/B} (``g`` coprime to ``B``), with
  ``g / B`` near the golden-ratio conjugate so that any run of consecutive positions is spread
  evenly over [0, 1) (a Fibonacci-like lattice), and one fresh uniform ``shift`` per step. The shift makes each
  ``u_k`` uniform whatever the sort, so every table is still an exact model sample and every
  average over tables is unbiased; tables that share a history draw stratified, not
  independent, tokens. At the first token of a row, where all tables are alike, this is
  systematic sampling: a token of probability p is drawn by floor(p*B) or ceil(p*B) tables.
  The average of exact conditionals over such prefixes has a lower variance than over independent
  ones (measured in ``benchmarks/bench_probe.py``); the +-1.96 SE bands computed as if the tables
  were independent are then conservative (also measured there).
"""

from __future__ import annotations

import math

import torch

DRAWS = ("iid", "rqmc")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618..., the most evenly spreading Kronecker step


def lattice_step(batch_size: int) -> int:
    """The generator ``g`` of the rank-1 lattice: coprime to ``batch_size``, ``g / B`` near 0.618."""
    g = max(1, round(_GOLDEN * batch_size))
    while math.gcd(g, batch_size) != 1:
        g += 1
    return g


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) token ids ``F^{-1}(u)`` for (B, V) probabilities and (B,) uniforms in [0, 1)."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    target = (u.double() * cdf[:, -1])[:, None]  # (B, 1): scale so rounding in the sum cannot overflow
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]  # first token whose CDF exceeds u
    return idx.clamp_max(probs.shape[1] - 1)


class IidSampler:
    """Independent draws: one multinomial sample per table and step."""

    def __init__(self, batch_size: int, generator: torch.Generator) -> None:
        self.gen = generator

    def draw(self, probs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(B,) sampled token ids from (B, V) probabilities; ``active`` is unused."""
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0]


class RqmcSampler:
    """Sorted Kronecker draws over the batch (see the module docstring)."""

    def __init__(self, batch_size: int, generator: torch.Generator) -> None:
        self.gen = generator
        self.history = torch.zeros(batch_size, dtype=torch.long)  # (B,) rank of each table's draws so far
        self.step = lattice_step(batch_size)

    def draw(self, probs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(B,) sampled token ids; tables not ``active`` draw too but their token is not recorded."""
        b, v = probs.shape
        order = torch.argsort(self.history, stable=True)  # (B,) tables by history
        position = torch.empty(b, dtype=torch.long)
        position[order] = torch.arange(b)
        shift = torch.rand(1, generator=self.gen, dtype=torch.float64)
        point = (position * self.step % b).double() / b  # (B,) a permutation of {0, 1/B, ...}
        tokens = inverse_cdf(probs, torch.frac(point + shift))
        written = torch.where(active, tokens + 1, torch.zeros_like(tokens))  # 0: nothing written
        self.history = torch.unique(self.history * (v + 1) + written, return_inverse=True)[1]
        return tokens


def make_sampler(draws: str, batch_size: int, generator: torch.Generator) -> IidSampler | RqmcSampler:
    """The sampler named ``draws`` (``iid`` or ``rqmc``) for a batch of ``batch_size`` tables."""
    if draws == "iid":
        return IidSampler(batch_size, generator)
    if draws == "rqmc":
        return RqmcSampler(batch_size, generator)
    raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
