"""The activation-sparsity profiler: stream token blocks through a model with hooks on every
activation and every Linear input, and return per-site statistics (see :mod:`.stats`).

Joined with weight pruning: for every Linear the result also gives the weight density (non-zero
weights), the density of its input, their product, and, for pruned weights, the exact fraction
of multiply-adds whose weight and input are both non-zero (``sum_j nnz(W[:, j]) * [x_j != 0]``
per token, over ``out * in``): the work a sparse-sparse kernel would still have to do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import models
from prunescope.activations.sites import find_activations, find_linears, hooked
from prunescope.activations.stats import SiteAccumulator, SiteStats, check_eps
from prunescope.errors import PrunescopeError

log = logging.getLogger(__name__)

DEFAULT_EPS = (0.01, 0.05, 0.1, 0.25)
DEFAULT_TOKEN_EPS = 0.1
DEFAULT_SAMPLE_EVERY = 8  # 1,024 of the default 8,192 tokens: see benchmarks/bench_activations.py


@dataclass(frozen=True)
class LinearCost:
    """Weight sparsity and input sparsity of one Linear, and the multiply-adds that still matter."""

    name: str
    shape: tuple[int, int]  # (out, in)
    site: str  # the Linear-input site that measured its input
    weight_density: float
    input_density: float  # fraction of input values that are not exactly zero
    input_density_eps: dict[str, float]  # fraction with |x| >= eps * rms, per eps
    product: float  # weight_density * input_density (independence estimate)
    effective_mac_frac: float  # exact: MACs with non-zero weight and non-zero input / dense MACs


@dataclass(frozen=True)
class Profile:
    """Everything the profiler measured on ``tokens`` tokens."""

    tokens: int
    seqlen: int
    eps: tuple[float, ...]
    token_eps: float
    sample_every: int
    rms_mode: str
    seconds: float
    sites: tuple[SiteStats, ...]
    linears: tuple[LinearCost, ...]

    def activation_sites(self) -> tuple[SiteStats, ...]:
        """The sites that are activation outputs, in model order."""
        return tuple(s for s in self.sites if s.kind == "activation")


def validate_profile_args(eps: tuple[float, ...], token_eps: float, sample_every: int) -> None:
    """Raise a PrunescopeError for eps <= 0 (or out of range) and a bad sampling stride."""
    if not eps:
        raise PrunescopeError("give at least one eps (a fraction of the layer's RMS), e.g. 0.01,0.05,0.1")
    for e in (*eps, token_eps):
        check_eps(e)
    if sample_every < 1:
        raise PrunescopeError(f"sample_every must be >= 1 (1 = every token), got {sample_every}")


class _Costs:
    """Exact effective-MAC counters for the pruned Linears (weight density < 1)."""

    def __init__(self, linears: dict[str, nn.Linear], sample_every: int) -> None:
        self.sample_every = sample_every
        self.colnnz = {}
        for name, m in linears.items():
            nnz = (models.weight_of(m).detach() != 0).sum(0).float()  # [in] non-zero weights per input column
            if float(nnz.sum()) < m.weight.numel():
                self.colnnz[name] = nnz
        self.macs = dict.fromkeys(self.colnnz, 0.0)
        self.tokens = dict.fromkeys(self.colnnz, 0)

    def update(self, names: list[str], x: torch.Tensor) -> None:
        s = x.detach().reshape(-1, x.shape[-1])  # [T, in]
        s = s[: max(1, s.shape[0] // self.sample_every)]  # [t, in] a contiguous 1/k of the rows
        nz = (s != 0).to(s.dtype) if any(n in self.colnnz for n in names) else None
        for name in names:
            if name in self.colnnz and nz is not None:
                self.macs[name] += float((nz @ self.colnnz[name].to(s.dtype)).sum())
                self.tokens[name] += s.shape[0]


def _linear_costs(linears: dict[str, nn.Linear], shared: dict[str, list[str]],
                  sites: dict[str, SiteStats], costs: _Costs) -> tuple[LinearCost, ...]:
    owner = {n: site for site, names in shared.items() for n in names}
    out = []
    for name, m in linears.items():
        site = sites.get(owner.get(name, ""))
        if site is None:  # never called in the forward (unused head, ...)
            continue
        w_density = float((models.weight_of(m) != 0).float().mean())
        x_density = 1.0 - site.zero_frac
        if name in costs.colnnz and costs.tokens[name]:
            eff = costs.macs[name] / (costs.tokens[name] * m.weight.numel())
        else:
            eff = x_density * w_density  # dense weight: exact as it is
        out.append(LinearCost(
            name=name, shape=tuple(m.weight.shape), site=site.name, weight_density=w_density,
            input_density=x_density,
            input_density_eps={e: 1.0 - f for e, f in site.near_zero_frac.items()},
            product=w_density * x_density, effective_mac_frac=eff,
        ))
    return tuple(out)


@torch.no_grad()
def profile(
    model: nn.Module,
    blocks: torch.Tensor,
    eps: tuple[float, ...] = DEFAULT_EPS,
    token_eps: float = DEFAULT_TOKEN_EPS,
    sample_every: int = DEFAULT_SAMPLE_EVERY,
    batch_size: int = 4,
    progress: bool = True,
) -> Profile:
    """Profile activations and Linear inputs of ``model`` on ``blocks`` (``LongTensor[n, seqlen]``).

    Raises:
        PrunescopeError: bad eps / stride, or a model with no recognised activation.
    """
    validate_profile_args(eps, token_eps, sample_every)
    acts = find_activations(model)
    linears = find_linears(model)
    accs: dict[str, SiteAccumulator] = {}
    costs = _Costs(linears, sample_every)
    device = models.input_device(model)

    def sink(site: str, x: torch.Tensor) -> None:
        acc = accs.get(site)
        if acc is None:
            kind = "activation" if site in acts else "linear_input"
            acc = accs[site] = SiteAccumulator(
                site, kind, acts.get(site, "input"), (site,), eps, token_eps, sample_every)
        acc.update(x)
        if site in linears and costs.colnnz:
            costs.update(hooks.shared[site], x)

    t0 = time.perf_counter()
    with hooked(model, acts, linears, sink) as hooks:
        batches = range(0, blocks.shape[0], batch_size)
        for start in tqdm(batches, desc="profile activations", disable=not progress, leave=False):
            model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
        shared = {k: list(v) for k, v in hooks.shared.items()}
    seconds = time.perf_counter() - t0
    sites = {}
    for name, acc in accs.items():
        acc.modules = tuple(shared.get(name, [name]))
        sites[name] = acc.result()
    return Profile(
        tokens=blocks.numel(), seqlen=blocks.shape[1], eps=tuple(eps), token_eps=token_eps,
        sample_every=sample_every, rms_mode="fixed from each site's first batch",
        seconds=seconds, sites=tuple(sites.values()),
        linears=_linear_costs(linears, shared, sites, costs),
    )
