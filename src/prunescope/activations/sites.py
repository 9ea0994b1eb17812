"""Find the activation modules of a model and hook them and the inputs of its Linear layers.

Recognised activations: ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Mish`` and relatives, and the
activation classes of ``transformers.activations`` (HF MLPs keep theirs as ``act_fn``). For a
gated MLP (SwiGLU: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) the hook on ``act_fn`` sees
the gate activation and the pre-hook on ``down_proj`` sees the product that enters it.

Linear layers that read the very same tensor (q/k/v, gate/up) form one site: the first forward
finds them by object identity and the later hooks are removed, so each input is measured once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunescope.errors import PrunescopeError

# torch activation types and their family name in reports
_TORCH_ACTS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Mish: "mish", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu",
    nn.Softplus: "softplus", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish",
}


def activation_family(module: nn.Module) -> str | None:
    """The family name ("relu", "gelu", "silu", ...) of a recognised activation module, else None."""
    for cls, family in _TORCH_ACTS.items():
        if isinstance(module, cls):
            return family
    cls = type(module)
    if cls.__module__ == "transformers.activations" and cls.__name__ != "LinearActivation":
        name = cls.__name__.lower().removesuffix("activation")
        return {"pytorchgelutanh": "gelu_tanh", "newgelu": "gelu_tanh", "gelutanh": "gelu_tanh"}.get(name, name)
    return None


def find_activations(model: nn.Module) -> dict[str, str]:
    """Module name -> family of every recognised activation module.

    Raises:
        PrunescopeError: none found; the message lists the module types the model holds.
    """
    found = {n: f for n, m in model.named_modules() if (f := activation_family(m)) is not None}
    if not found:
        leaf_types = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise PrunescopeError(
            f"{type(model).__name__} has no recognised activation module (looked for nn.ReLU/GELU/"
            f"SiLU/Mish and transformers.activations classes); its leaf module types are: "
            f"{', '.join(leaf_types)}"
        )
    return found


def find_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


Sink = Callable[[str, torch.Tensor], None]


class SiteHooks:
    """Forward hooks that hand each site's tensor to ``sink(site_name, tensor)``.

    Activation sites are named after the activation module; Linear-input sites after the first
    Linear that reads the tensor, with the others that share it listed in ``shared[site]``.
    """

    def __init__(self, model: nn.Module, activations: dict[str, str], linears: dict[str, nn.Linear],
                 sink: Sink) -> None:
        self.model, self.sink = model, sink
        self.shared: dict[str, list[str]] = {n: [n] for n in linears}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._first = True
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._handles["<model>"] = model.register_forward_pre_hook(self._on_model)
        for name in activations:
            module = model.get_submodule(name)
            self._handles[name] = module.register_forward_hook(self._act_hook(name))
        for name, module in linears.items():
            self._handles[f"in:{name}"] = module.register_forward_pre_hook(self._linear_hook(name))

    def _on_model(self, module: nn.Module, args: tuple) -> None:
        if self._seen:  # the first forward is over: drop the hooks of aliased Linears
            self._first = False
            self._seen.clear()

    def _act_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.sink(name, output)
        return hook

    def _linear_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._first:
                prev = self._seen.get(id(x))
                if prev is not None and prev[0]() is x:  # same tensor object as an earlier Linear
                    owner = prev[1]
                    self.shared[owner].append(name)
                    del self.shared[name]
                    self._handles.pop(f"in:{name}").remove()
                    return
                self._seen[id(x)] = (weakref.ref(x), name)
            self.sink(name, x)
        return hook

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._seen.clear()


@contextmanager
def hooked(model: nn.Module, activations: dict[str, str], linears: dict[str, nn.Linear],
           sink: Sink) -> Iterator[SiteHooks]:
    """Context manager around :class:`SiteHooks`; hooks are removed on exit, also on error."""
    hooks = SiteHooks(model, activations, linears, sink)
    try:
        yield hooks
    finally:
        hooks.remove()
