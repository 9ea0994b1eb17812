"""Sequential calibration: run calibration tokens through the decoder one layer at a time.

The inputs of the first decoder layer (hidden states plus the keyword arguments the layer needs:
attention mask, rotary position embeddings, ...) are captured once with a pre-hook that stops the
forward. After that each layer is called directly on the held activations: once with hooks that
accumulate per-Linear input statistics, and (after it is pruned) once more to produce the inputs
of the next layer. Only one layer's inputs and outputs are held at a time:
``2 * samples * seqlen * hidden * 4`` bytes in float32 (32 x 512 x 576 floats = 38 MB per copy for
SmolLM2-135M, so about 75 MB), plus one batch's intermediate activations and the statistics
(``[in]`` per Linear for Wanda, ``[in, in]`` per distinct input for SparseGPT).

Linear modules that read the very same input tensor (q/k/v, gate/up) share one statistics object,
so each Hessian is accumulated once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunescope import distributed, models
from prunescope.models import DecoderAdapter

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first decoder layer."""


@dataclass
class LayerInputs:
    """The held calibration activations at one depth: per batch, hidden states and layer kwargs.

    Attributes:
        hidden: per batch ``[b, seqlen, hidden]`` inputs of the current decoder layer.
        args: per batch extra positional arguments of the layer call (usually empty).
        kwargs: per batch keyword arguments (attention mask, position embeddings, ...).
    """

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]

    def nbytes(self) -> int:
        """Bytes held by the hidden states (one copy)."""
        return sum(h.numel() * h.element_size() for h in self.hidden)


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, adapter: DecoderAdapter, blocks: torch.Tensor, batch_size: int = 8,
    what: str = "calibration windows",
) -> LayerInputs:
    """Run ``blocks`` (``LongTensor[n, seqlen]``) up to the first decoder layer and keep its inputs.

    Only the parts before the first layer need their weights (the layers may be on ``meta``,
    see :mod:`prunescope.offload`). Launched in several processes, each keeps only its share of
    the windows (:func:`prunescope.distributed.shard`); the sums are added up over processes later."""
    blocks = distributed.shard(blocks, what)
    first = adapter.layers(model)[0]
    captured = LayerInputs([], [], [])

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(kwargs)
        raise _StopForward

    device = model.get_submodule(adapter.embed_path).weight.device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, blocks.shape[0], batch_size):
            try:
                model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Call ``layer`` on every held batch; the outputs are the next layer's inputs."""
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        out = layer(hidden, *args, **kwargs)
        outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return LayerInputs(outputs, inputs.args, inputs.kwargs)


@dataclass
class InputStats:
    """Statistics of one Linear input over calibration tokens (shared by modules with that input).

    Attributes:
        sq_sum: ``[in]`` sum over tokens of ``x_j^2`` (Wanda's squared column norms).
        xtx: ``[in, in]`` sum over tokens of ``x x^T`` (only when a Hessian or Gram is wanted).
        lin_sum: ``[in]`` float64 sum over tokens of ``x_j`` (only when means are wanted).
        tokens: number of tokens seen.
    """

    sq_sum: torch.Tensor
    xtx: torch.Tensor | None = None
    lin_sum: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``[..., in]``."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.sq_sum += flat.pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(flat.T, flat)  # [in, in]
        if self.lin_sum is not None:
            self.lin_sum += flat.sum(0)
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2 X X^T / tokens`` ([in, in]), the SparseGPT Hessian (mean over tokens).

        Computed in place: the statistics give up their ``xtx`` (no second ``[in, in]`` copy,
        127 MB for a 5632-wide input), so call this once per statistics object."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without a Hessian (or it was taken already)")
        h, self.xtx = self.xtx.mul_(2.0 / max(self.tokens, 1)), None
        return h


@dataclass
class _Collector:
    """Forward pre-hooks that route each module's input to a (possibly shared) InputStats."""

    hessian: bool
    means: bool = False
    stop_after: int | None = None  # end the layer's forward once this many modules saw their input
    stats: dict[str, InputStats] = field(default_factory=dict)
    _batch_inputs: list[tuple[torch.Tensor, InputStats]] = field(default_factory=list)
    _batch_names: set[str] = field(default_factory=set)

    def hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._add(name, args[0])
            self._batch_names.add(name)
            if self.stop_after is not None and len(self._batch_names) >= self.stop_after:
                raise _StopForward  # the rest of the layer computes nothing these modules read

        return hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        """Accumulate ``x`` ([b, seqlen, in]) into ``name``'s statistics, shared with a sibling
        that reads the very same tensor object (q/k/v, gate/up)."""
        for seen, shared in self._batch_inputs:
            if seen is x:
                self.stats.setdefault(name, shared)
                return
        st = self.stats.get(name)
        if st is None:
            n = x.shape[-1]
            xtx = torch.zeros(n, n, device=x.device) if self.hessian else None
            lin = torch.zeros(n, dtype=torch.float64, device=x.device) if self.means else None
            # with means, E[x^2] - E[x]^2 (FLAP's variance) needs the squares in float64 too
            sq = torch.zeros(n, dtype=torch.float64 if self.means else torch.float32, device=x.device)
            st = self.stats[name] = InputStats(sq, xtx, lin)
        st.add(x)
        self._batch_inputs.append((x, st))

    def end_batch(self) -> None:
        """Forget this batch's input tensors (kept only to detect shared inputs)."""
        self._batch_inputs.clear()
        self._batch_names.clear()


@contextmanager
def _hooks(modules: Mapping[str, nn.Module], collector: _Collector) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(collector.hook_for(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_stats(
    layer: nn.Module,
    modules: Mapping[str, nn.Module],
    inputs: LayerInputs,
    hessian: bool,
    means: bool = False,
    stop_early: bool = False,
) -> dict[str, InputStats]:
    """One pass of ``layer`` over the held inputs, accumulating statistics of each module's input.

    Args:
        layer: a decoder layer.
        modules: name -> Linear inside ``layer`` whose input statistics are wanted.
        inputs: the layer's held calibration inputs.
        hessian: also accumulate ``X X^T`` (SparseGPT; the Gram of structured compensation)
            besides the squared norms (Wanda).
        means: also accumulate ``sum x`` (FLAP's fluctuation, bias compensation).
        stop_early: end each batch's forward as soon as every module has seen its input (the
            layer's later computation is not needed, e.g. the MLP when only attention is read).

    Returns:
        name -> statistics; modules reading the same tensor share one object.
    """
    collector = _Collector(hessian, means, len(modules) if stop_early else None)
    with _hooks(modules, collector):
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            try:
                layer(hidden, *args, **kwargs)
            except _StopForward:
                pass
            finally:
                collector.end_batch()
    missing = [n for n in modules if n not in collector.stats]
    if missing:
        raise RuntimeError(f"calibration never reached {', '.join(missing)}")
    _sum_over_processes(collector.stats.values())
    return collector.stats


def _sum_over_processes(stats: Iterable[InputStats]) -> None:
    """Each process saw its share of the windows: sum the statistics over all of them."""
    if not distributed.active():
        return
    for st in {id(s): s for s in stats}.values():  # shared objects (q/k/v) summed once
        distributed.all_sum(t for t in (st.sq_sum, st.xtx, st.lin_sum) if t is not None)
        st.tokens = int(distributed.sum_numbers(st.tokens)[0])


LayerStep = Callable[[int, nn.Module, LayerInputs], None]
# index -> context in which decoder layer ``index`` has its weights (offload: onload, write, free)
LayerVisit = Callable[[int], AbstractContextManager[Any]]


@torch.no_grad()
def sequential(
    model: nn.Module, blocks: torch.Tensor, step: LayerStep, last: int, batch_size: int = 8,
    desc: str = "layers", visit: LayerVisit | None = None,
    front: Callable[[], AbstractContextManager[Any]] | None = None,
) -> int:
    """The one layer-by-layer loop of every calibrated method, unstructured or structured.

    For each decoder layer ``0..last``: ``step(index, layer, inputs)`` scores, selects and
    applies (it may replace the layer in the model); then the layer now in the model is run on
    the inputs to give the next layer's inputs, so each layer sees the outputs of the already
    pruned layers before it. With ``visit`` (an offloaded model), both happen inside
    ``visit(index)``, the only time the layer's weights are on the device, and the first
    layer's inputs are computed inside ``front()`` (which loads the embeddings).

    Returns:
        Bytes of calibration activations held (this layer's inputs and outputs).
    """
    adapter = models.adapter_for(model)
    with front() if front is not None else nullcontext():
        inputs = capture_first_layer_inputs(model, adapter, blocks, batch_size)
    log.info("calibration activations: %.1f MB per copy, two copies held", inputs.nbytes() / 2**20)
    decoder = adapter.layers(model)
    for index in tqdm(range(last + 1), desc=desc, unit="layer", leave=False):
        with visit(index) if visit is not None else nullcontext():
            step(index, decoder[index], inputs)
            if index < last:
                inputs = run_layer(decoder[index], inputs)
    return 2 * inputs.nbytes()
