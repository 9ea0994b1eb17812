"""A drop-in twin of ``torch.nn.utils.prune``: the same names and semantics, lighter and faster.

Pruning ``module.<name>`` re-parametrises it exactly as torch does, so state dicts carry the
same keys (``<name>_orig``, ``<name>_mask``) and load into each other, but stores it lighter:

* ``<name>_orig`` is the original ``nn.Parameter`` with its pruned entries zeroed in place
  (torch keeps their old values there; ours are zero, see below);
* ``<name>_mask`` is a **bool** buffer (torch: a mask in the weight's float dtype, 4x larger);
* ``module.<name>`` is a view of ``<name>_orig`` (same storage), not a third full tensor.

A pruned model therefore costs 1.25x a dense float32 one (torch: about 3x). Semantics are kept:
gradients reaching ``<name>_orig`` are multiplied by the mask, and the forward pre-hook re-zeroes
pruned entries (``orig *= mask``, exactly torch's product, signed zeros and NaN included) only
when ``<name>_orig`` or the mask changed since the last forward (an optimizer step, a
``load_state_dict``), so a forward costs the same as a dense one.

The one visible difference: ``<name>_orig`` holds zeros, not the original values, at pruned
entries. Forward outputs, gradients, ``remove`` and state dicts loaded either way (torch's float
mask becomes bool on load; torch copies our bool mask into its float one) give identical tensors.
Un-pruning by hand-editing a mask back to 1 cannot restore values that are gone.

``global_unstructured`` with :class:`L1Unstructured` never concatenates the scores: it selects
the threshold by radix selection (:func:`prunescope.pruning.masks.keep_smallest`), exact to the count.
Bad input raises ``ValueError`` (:class:`~prunescope.errors.PrunescopeError`) or ``TypeError``
naming the module, the parameter and its shape, before anything is changed.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.utils.prune as _torch_prune
from torch import nn

from prunescope.errors import PrunescopeError
from prunescope.pruning import masks

__all__ = [
    "BasePruningMethod",
    "PruningContainer",
    "Identity",
    "RandomUnstructured",
    "L1Unstructured",
    "RandomStructured",
    "LnStructured",
    "CustomFromMask",
    "identity",
    "random_unstructured",
    "l1_unstructured",
    "random_structured",
    "ln_structured",
    "global_unstructured",
    "custom_from_mask",
    "remove",
    "is_pruned",
]

_PRUNING_TYPES = ("unstructured", "structured", "global")


class PruneDimError(PrunescopeError, IndexError):
    """A ``dim`` out of range: a ``ValueError`` that torch's callers may also catch as ``IndexError``."""


# --------------------------------------------------------------------------- validation


def _describe(module: nn.Module, name: str, shape: tuple[int, ...] | torch.Size | None) -> str:
    """'Linear(in_features=4, out_features=3, bias=True) parameter 'weight' of shape (3, 4)'."""
    extra = module.extra_repr()
    what = f"{type(module).__name__}({extra})" if len(extra) < 80 else type(module).__name__
    shape_txt = "" if shape is None else f" of shape {tuple(shape)}"
    return f"{what} parameter {name!r}{shape_txt}"


def _check_amount_type(amount: Any) -> None:
    """The checks torch does at construction: a real number, float in [0, 1] or int >= 0."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount={amount!r} must be an int (a count) or a float in [0, 1]")
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise PrunescopeError(f"amount={amount} must be a non-negative count or a float in [0, 1]")
    elif not 0.0 <= float(amount) <= 1.0:  # also rejects NaN
        raise PrunescopeError(f"amount={amount} must be a float in [0, 1] or a non-negative count")


def _n_to_prune(amount: int | float, size: int, unit: str = "entries") -> int:
    """The count ``amount`` stands for among ``size`` units (torch: ``round(amount * size)``)."""
    if isinstance(amount, numbers.Integral):
        if amount > size:
            raise PrunescopeError(
                f"amount={amount} is more than the {size} {unit} left to prune; "
                f"give a count in [0, {size}] or a fraction in [0, 1]"
            )
        return int(amount)
    return round(float(amount) * size)


def _check_n(n: Any) -> None:
    """``n`` as ``torch.norm`` takes it: a real number (inf, -inf included), 'fro' or 'nuc'."""
    if n in ("fro", "nuc"):
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(float(n)):
        raise PrunescopeError(
            f"n={n!r} is not a norm order; use a real number (1, 2, 3, float('inf'), "
            "float('-inf'), ...), 'fro' or 'nuc'"
        )


def _check_dim(t: torch.Tensor, dim: int) -> int:
    """``dim`` made non-negative, for a tensor with at least 2 dims (channels need structure)."""
    if t.dim() <= 1:
        raise PrunescopeError(
            f"structured pruning needs a tensor of at least 2 dims (channels), got shape {tuple(t.shape)}"
        )
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim={dim!r} must be an int")
    if not -t.dim() <= dim < t.dim():
        raise PruneDimError(f"dim={dim} is out of range for shape {tuple(t.shape)}; use -{t.dim()}..{t.dim() - 1}")
    return int(dim) % t.dim()


def _as_bool_mask(mask: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """A 0/1 (or bool) mask as a bool tensor; anything else is a user error."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise PrunescopeError(f"{what} has shape {tuple(mask.shape)}; expected {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise PrunescopeError(f"{what} must hold only 0 and 1 (or be a bool tensor)")
    return mask != 0


def _target(module: Any, name: Any) -> tuple[torch.Tensor, str]:
    """The tensor ``module.<name>`` that pruning acts on, validated; and its description."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {name!r} for {type(module).__name__}")
    if _find_hook(module, name, _torch_prune.BasePruningMethod) is not None:
        raise PrunescopeError(
            f"{_describe(module, name, None)} is pruned by torch.nn.utils.prune; call "
            "torch.nn.utils.prune.remove first, or load its state dict into a prunescope-pruned model"
        )
    if _find_hook(module, name) is not None:
        t = module._parameters[name + "_orig"]
    else:
        t = module._parameters.get(name)
        if t is None:
            names = [n for n, p in module.named_parameters(recurse=False) if p is not None]
            raise PrunescopeError(
                f"{type(module).__name__} has no parameter {name!r}; its parameters are {names}"
            )
    where = _describe(module, name, t.shape)
    if not t.is_floating_point():
        raise TypeError(f"{where} has dtype {t.dtype}; only floating-point tensors can be pruned")
    return t, where


def _check_scores(scores: Any, shape: torch.Size, where: str) -> torch.Tensor:
    """Importance scores: a real tensor shaped like the parameter."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"importance_scores for {where} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.shape != shape:
        raise PrunescopeError(
            f"importance_scores for {where} have shape {tuple(scores.shape)}; expected {tuple(shape)}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"importance_scores for {where} have dtype {scores.dtype}; use real numbers")
    return scores.detach()


def _with_context(where: str, fn, *args, **kwargs):
    """Call ``fn``; re-raise user errors (and torch's own) with ``where`` in front."""
    try:
        return fn(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    except IndexError as e:
        raise PruneDimError(f"{where}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise PrunescopeError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- hooks and state


def _find_hook(module: nn.Module, name: str, kind: type | None = None) -> int | None:
    """The key of the pruning forward pre-hook of ``module.<name>`` (ours by default), or None."""
    kind = kind or BasePruningMethod
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, kind) and getattr(hook, "_tensor_name", None) == name:
            return key
    return None


class _GradMask:
    """Tensor hook: the gradient of ``mask * orig`` w.r.t. ``orig`` is ``grad * mask``."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask


def _sync(module: nn.Module, name: str, hook: "BasePruningMethod", track_grad: bool) -> None:
    """Re-zero pruned entries if ``orig`` or the mask changed, and expose ``module.<name>``.

    ``module.<name>`` becomes a view of ``<name>_orig`` (shared storage): when ``track_grad``
    and grad mode is on, one that carries gradients (masked) back to ``<name>_orig``; otherwise
    a detached alias, which keeps the module deep-copyable.
    """
    orig = module._parameters[name + "_orig"]
    mask = module._buffers[name + "_mask"]
    stamp = (orig.data_ptr(), orig._version, mask.data_ptr(), mask._version)
    if hook._stamp != stamp:
        with torch.no_grad():
            orig.mul_(mask)  # the product torch computes, in place: -0.0 and NaN*0 alike
        hook._stamp = (orig.data_ptr(), orig._version, mask.data_ptr(), mask._version)
    if track_grad and orig.requires_grad and torch.is_grad_enabled():
        w = orig.view_as(orig)  # same storage, grad flows to orig
        w.register_hook(_GradMask(mask))
    else:
        w = orig.detach()
    module.__dict__[name] = w


class _MaskLoadHook:
    """``load_state_dict`` pre-hook: a saved float mask (torch's) is loaded as our bool mask."""

    def __init__(self, name: str) -> None:
        self._tensor_name = name

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key = prefix + self._tensor_name + "_mask"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dtype != torch.bool:
            state_dict[key] = value != 0


class _ResyncHook:
    """``load_state_dict`` post-hook: re-zero entries that a loaded ``_orig`` (torch's) holds."""

    def __init__(self, name: str) -> None:
        self._tensor_name = name

    def __call__(self, module, incompatible_keys) -> None:
        key = _find_hook(module, self._tensor_name)
        if key is not None:
            hook = module._forward_pre_hooks[key]
            hook._stamp = None
            _sync(module, self._tensor_name, hook, track_grad=False)


def _drop_load_hooks(module: nn.Module, name: str) -> None:
    for hooks in (module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks):
        for key in [k for k, h in hooks.items() if _load_hook_name(h) == name]:
            del hooks[key]


def _load_hook_name(hook: Any) -> str | None:
    hook = getattr(hook, "hook", hook)  # pre-hooks are wrapped by torch
    if isinstance(hook, (_MaskLoadHook, _ResyncHook)):
        return hook._tensor_name
    return None


def _install(module: nn.Module, name: str, method: "BasePruningMethod", mask: torch.Tensor) -> None:
    """Commit a computed mask: re-parametrise on first pruning, swap the mask and hook after."""
    old_key = _find_hook(module, name)
    if old_key is None:
        orig = module._parameters[name]
        module.register_parameter(name + "_orig", orig)
        del module._parameters[name]
        module.register_load_state_dict_pre_hook(_MaskLoadHook(name))
        module.register_load_state_dict_post_hook(_ResyncHook(name))
    else:
        del module._forward_pre_hooks[old_key]
        module._buffers.pop(name + "_mask", None)
    orig = module._parameters[name + "_orig"]
    module.register_buffer(name + "_mask", mask.to(device=orig.device).contiguous())
    method._stamp = None
    module.register_forward_pre_hook(method)
    _sync(module, name, method, track_grad=False)


# --------------------------------------------------------------------------- methods


class BasePruningMethod(ABC):
    """Base of every pruning method: subclass it with ``PRUNING_TYPE`` and ``compute_mask``.

    ``compute_mask(t, default_mask)`` receives the importance scores ``t`` and the current
    mask as a **bool** tensor (torch passes a float one) and returns the new mask, bool or 0/1.
    An instance is also the forward pre-hook that keeps ``module.<name>`` pruned.
    """

    PRUNING_TYPE: str = "unstructured"
    _tensor_name: str | None = None
    _stamp: tuple | None = None

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        """Forward pre-hook: re-zero pruned entries if anything changed; expose the weight."""
        _sync(module, self._tensor_name, self, track_grad=True)

    @abstractmethod
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """The new mask for scores ``t``, on top of ``default_mask`` (same shape as ``t``)."""

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        """The pruned tensor ``<name>_orig * <name>_mask`` (a new tensor)."""
        if self._tensor_name is None:
            raise PrunescopeError(f"{type(self).__name__} has not been applied to a module yet")
        orig = getattr(module, self._tensor_name + "_orig")
        return orig * getattr(module, self._tensor_name + "_mask")

    @classmethod
    def apply(cls, module: nn.Module, name: str, *args: Any, importance_scores: torch.Tensor | None = None, **kwargs: Any):
        """Prune ``module.<name>`` with this method (on top of earlier pruning); return the hook.

        Everything is validated and the mask computed before the module is touched.
        """
        t, where = _target(module, name)
        method = _with_context(where, cls, *args, **kwargs)
        method._tensor_name = name
        scores = t if importance_scores is None else _check_scores(importance_scores, t.shape, where)
        old_key = _find_hook(module, name)
        if old_key is None:
            container = None
            default = torch.ones(t.shape, dtype=torch.bool, device=t.device)
            mask = _with_context(where, method._first_mask, scores.detach(), default)
        else:
            old = module._forward_pre_hooks[old_key]
            if importance_scores is None:
                scores = _current_weight(module, name, old)  # the pruned weight, as torch scores it
            container = PruningContainer(*(old if isinstance(old, PruningContainer) else (old,)), method)
            default = module._buffers[name + "_mask"]
            mask = _with_context(where, container.compute_mask, scores.detach(), default)
        mask = _with_context(where, _as_bool_mask, mask, t.shape, f"the mask computed by {cls.__name__}")
        if container is not None:
            old = module._forward_pre_hooks[old_key]
            if isinstance(old, PruningContainer):
                old.add_pruning_method(method)
                container = old
            method = container
        _install(module, name, method, mask)
        return method

    def _first_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """The mask on first pruning (torch calls ``compute_mask`` with a mask of ones)."""
        return self.compute_mask(t, default_mask)

    def prune(self, t: torch.Tensor, default_mask: torch.Tensor | None = None, importance_scores: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` times the mask this method computes for it (a new tensor; no module involved)."""
        scores = t if importance_scores is None else _check_scores(importance_scores, t.shape, "tensor")
        default = torch.ones(t.shape, dtype=torch.bool, device=t.device) if default_mask is None else default_mask
        default = _as_bool_mask(default, t.shape, "default_mask")
        mask = _as_bool_mask(self.compute_mask(scores.detach(), default), t.shape, "the mask")
        return t * mask

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent: ``module.<name>`` is again a plain parameter (zeros kept).

        Like torch, this does not remove the forward pre-hook; the function :func:`remove` does.
        """
        name = self._tensor_name
        if name is None or name + "_orig" not in module._parameters:
            raise PrunescopeError(f"{type(module).__name__} parameter {name!r} is not pruned; nothing to remove")
        _sync(module, name, self, track_grad=False)  # pruned entries are zero now
        module.__dict__.pop(name, None)
        orig = module._parameters.pop(name + "_orig")
        del module._buffers[name + "_mask"]
        _drop_load_hooks(module, name)
        module.register_parameter(name, orig)


class PruningContainer(BasePruningMethod):
    """The pruning methods applied, in order, to one tensor (iterative pruning).

    A new method acts only on what earlier ones left: 'unstructured' on the entries still
    unpruned, 'structured' on the channels not yet entirely pruned, 'global' on everything.
    """

    def __init__(self, *args: BasePruningMethod) -> None:
        self._pruning_methods: tuple[BasePruningMethod, ...] = ()
        if len(args) == 1 and not isinstance(args[0], BasePruningMethod) and isinstance(args[0], Iterable):
            args = tuple(args[0])
        if args:
            self._tensor_name = args[0]._tensor_name
        for method in args:
            self.add_pruning_method(method)

    def add_pruning_method(self, method: BasePruningMethod) -> None:
        """Append ``method``; it must act on the same tensor name."""
        if method is None:
            return
        if not isinstance(method, BasePruningMethod):
            raise TypeError(f"{type(method).__name__} is not a prunescope.prune.BasePruningMethod")
        if self._tensor_name is not None and method._tensor_name != self._tensor_name:
            raise PrunescopeError(
                f"a PruningContainer for {self._tensor_name!r} cannot hold a method for {method._tensor_name!r}"
            )
        self._pruning_methods += (method,)

    def __len__(self) -> int:
        return len(self._pruning_methods)

    def __iter__(self):
        return iter(self._pruning_methods)

    def __getitem__(self, idx: int) -> BasePruningMethod:
        return self._pruning_methods[idx]

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Apply the latest method to what ``default_mask`` left and combine the two masks."""
        method = self._pruning_methods[-1]
        kind = method.PRUNING_TYPE
        default_mask = _as_bool_mask(default_mask, t.shape, "default_mask")
        if kind == "unstructured":
            if _is_plain_l1(method):
                return method._mask_among(t, default_mask)  # type: ignore[attr-defined]
            slc: Any = default_mask  # the entries still unpruned, flattened
        elif kind == "structured":
            if not hasattr(method, "dim"):
                raise AttributeError('methods of PRUNING_TYPE "structured" need a `dim` attribute')
            dim = _check_dim(t, method.dim)
            others = [d for d in range(t.dim()) if d != dim]
            alive = default_mask.any(dim=others) if others else default_mask  # [channels]
            slc = tuple(alive if d == dim else slice(None) for d in range(t.dim()))
        elif kind == "global":
            return _as_bool_mask(method.compute_mask(t, default_mask), t.shape, "the new mask")
        else:
            raise PrunescopeError(f"PRUNING_TYPE {kind!r} of {type(method).__name__}; use one of {_PRUNING_TYPES}")
        part_default = default_mask[slc]
        partial = method.compute_mask(t[slc], part_default.clone())
        partial = _as_bool_mask(partial, part_default.shape, "the partial mask")
        new_mask = default_mask.clone()
        new_mask[slc] = partial
        return new_mask


class Identity(BasePruningMethod):
    """Re-parametrise without pruning anything (a mask of ones)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask

    @classmethod
    def apply(cls, module: nn.Module, name: str):  # type: ignore[override]
        return super().apply(module, name)


class RandomUnstructured(BasePruningMethod):
    """Prune ``amount`` of the still-unpruned entries at random (same RNG draws as torch)."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        _check_amount_type(amount)
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        k = _n_to_prune(self.amount, t.numel())
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if k:
            prob = torch.rand_like(t)  # the draw torch makes, for identical seeds
            mask.view(-1)[torch.topk(prob.reshape(-1), k=k).indices] = False
        return mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: int | float):  # type: ignore[override]
        return super().apply(module, name, amount=amount)


class L1Unstructured(BasePruningMethod):
    """Prune ``amount`` of the still-unpruned entries with the smallest ``|score|``.

    Selection is exact radix selection (:func:`prunescope.pruning.masks.keep_smallest`): the same mask
    as torch's ``topk`` on tie-free scores, the same count always.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        _check_amount_type(amount)
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Like torch: choose among all entries of ``t``, then combine with ``default_mask``."""
        k = _n_to_prune(self.amount, t.numel())
        keep = masks.keep_smallest([t], k, magnitude=True)[0]
        return keep & _as_bool_mask(default_mask, t.shape, "default_mask")

    def _mask_among(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Container path: prune ``amount`` of the entries ``default_mask`` keeps, no gather."""
        k = _n_to_prune(self.amount, int(default_mask.sum()))
        return masks.keep_smallest([t], k, magnitude=True, active=[default_mask])[0]

    def _first_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if not _is_plain_l1(self):
            return self.compute_mask(t, default_mask)  # a subclass with its own rule
        return masks.keep_smallest([t], _n_to_prune(self.amount, t.numel()), magnitude=True)[0]

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: int | float, importance_scores: torch.Tensor | None = None):  # type: ignore[override]
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def _is_plain_l1(method: BasePruningMethod) -> bool:
    """An L1Unstructured whose rule is ours (a subclass overriding compute_mask is not)."""
    return isinstance(method, L1Unstructured) and type(method).compute_mask is L1Unstructured.compute_mask


def _channel_mask(t: torch.Tensor, dim: int, keep_channels: torch.Tensor) -> torch.Tensor:
    """Bool [t.shape]: True on the channels of ``dim`` selected by ``keep_channels``."""
    mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    slc = tuple(keep_channels if d == dim else slice(None) for d in range(t.dim()))
    mask[slc] = True
    return mask


class RandomStructured(BasePruningMethod):
    """Prune ``amount`` of the still-unpruned channels along ``dim`` at random (torch's RNG draws)."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, dim: int = -1) -> None:
        _check_amount_type(amount)
        self.amount = amount
        self.dim = dim

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        dim = _check_dim(t, self.dim)
        n = t.shape[dim]
        k = _n_to_prune(self.amount, n, "channels")
        if k == 0:
            return default_mask
        prob = torch.rand(n)  # [channels]
        threshold = torch.kthvalue(prob, k=k).values
        return _channel_mask(t, dim, (prob > threshold).to(t.device)) & default_mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: int | float, dim: int = -1):  # type: ignore[override]
        return super().apply(module, name, amount=amount, dim=dim)


class LnStructured(BasePruningMethod):
    """Prune ``amount`` of the still-unpruned channels along ``dim`` with the smallest L``n`` norm."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, n: int | float | str, dim: int = -1) -> None:
        _check_amount_type(amount)
        _check_n(n)
        self.amount = amount
        self.n = n
        self.dim = dim

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        dim = _check_dim(t, self.dim)
        n_channels = t.shape[dim]
        k = _n_to_prune(self.amount, n_channels, "channels")
        others = [d for d in range(t.dim()) if d != dim]
        norm = torch.norm(t, p=self.n, dim=others)  # [channels], as torch computes it
        if k == 0:
            return default_mask
        kept = torch.topk(norm, k=n_channels - k, largest=True).indices  # [channels - k]
        return _channel_mask(t, dim, kept) & default_mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: int | float, n: int | float | str, dim: int, importance_scores: torch.Tensor | None = None):  # type: ignore[override]
        return super().apply(module, name, amount=amount, n=n, dim=dim, importance_scores=importance_scores)


class CustomFromMask(BasePruningMethod):
    """Prune with a given 0/1 (or bool) mask, on top of earlier pruning."""

    PRUNING_TYPE = "global"

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        self.mask = mask

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = _as_bool_mask(self.mask, default_mask.shape, "mask")
        return default_mask & mask.to(default_mask.device)

    @classmethod
    def apply(cls, module: nn.Module, name: str, mask: torch.Tensor):  # type: ignore[override]
        return super().apply(module, name, mask=mask)


# --------------------------------------------------------------------------- functions


def identity(module: nn.Module, name: str) -> nn.Module:
    """Re-parametrise ``module.<name>`` with a mask of ones; return the module."""
    Identity.apply(module, name)
    return module


def random_unstructured(module: nn.Module, name: str, amount: int | float) -> nn.Module:
    """Prune ``amount`` (fraction or count) of the unpruned entries at random; return the module."""
    RandomUnstructured.apply(module, name, amount)
    return module


def l1_unstructured(module: nn.Module, name: str, amount: int | float, importance_scores: torch.Tensor | None = None) -> nn.Module:
    """Prune ``amount`` of the unpruned entries with the smallest ``|score|``; return the module."""
    L1Unstructured.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


def random_structured(module: nn.Module, name: str, amount: int | float, dim: int) -> nn.Module:
    """Prune ``amount`` of the unpruned channels along ``dim`` at random; return the module."""
    RandomStructured.apply(module, name, amount, dim)
    return module


def ln_structured(module: nn.Module, name: str, amount: int | float, n: int | float | str, dim: int, importance_scores: torch.Tensor | None = None) -> nn.Module:
    """Prune ``amount`` of the unpruned channels along ``dim`` with the smallest L``n`` norm."""
    LnStructured.apply(module, name, amount, n, dim, importance_scores=importance_scores)
    return module


def custom_from_mask(module: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Prune ``module.<name>`` with a given 0/1 mask (combined with earlier pruning)."""
    CustomFromMask.apply(module, name, mask)
    return module


def remove(module: nn.Module, name: str) -> nn.Module:
    """Make the pruning of ``module.<name>`` permanent and drop its hooks; return the module."""
    key = _find_hook(module, name) if isinstance(module, nn.Module) else None
    if key is None:
        where = _describe(module, name, None) if isinstance(module, nn.Module) else repr(module)
        raise PrunescopeError(f"{where} is not pruned by prunescope.prune; nothing to remove")
    module._forward_pre_hooks[key].remove(module)
    del module._forward_pre_hooks[key]
    return module


def is_pruned(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule carries a pruning hook (ours or torch's)."""
    kinds = (BasePruningMethod, _torch_prune.BasePruningMethod)
    return any(
        isinstance(hook, kinds) for sub in module.modules() for hook in sub._forward_pre_hooks.values()
    )


def _global_targets(parameters: Any, importance_scores: Any) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """Validated ``(module, name, tensor, scores)`` for every entry of ``parameters``."""
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters must be an iterable of (module, name) pairs")
    if importance_scores is not None and not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be a dict {(module, name): tensor}")
    scores_by_key = importance_scores or {}
    targets, seen = [], set()
    for item in parameters:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"global_unstructured(): expected (module, name) pairs, got {item!r}")
        module, name = item
        t, where = _target(module, name)
        if (id(module), name) in seen:
            raise PrunescopeError(f"global_unstructured(): {where} is listed twice")
        seen.add((id(module), name))
        given = scores_by_key.get((module, name))
        if given is not None:
            scores = _check_scores(given, t.shape, where)
        else:
            key = _find_hook(module, name)
            scores = t if key is None else _current_weight(module, name, module._forward_pre_hooks[key])
        targets.append((module, name, t, scores))
    if not targets:
        raise PrunescopeError("global_unstructured(): no parameters given")
    return targets


def _global_where(targets: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]) -> str:
    """'global_unstructured over 210 tensors (Linear.weight (576, 576), ...)'."""
    shown = ", ".join(f"{type(m).__name__}.{n} {tuple(t.shape)}" for m, n, t, _ in targets[:3])
    more = ", ..." if len(targets) > 3 else ""
    return f"global_unstructured over {len(targets)} tensors ({shown}{more})"


def _current_weight(module: nn.Module, name: str, hook: BasePruningMethod) -> torch.Tensor:
    """The pruned tensor as a forward would see it, without touching the module.

    ``<name>_orig`` itself when it is in sync with the mask (the usual case: no copy), else
    ``orig * mask`` (after an optimizer step or a load, before the next forward).
    """
    orig = module._parameters[name + "_orig"]
    mask = module._buffers[name + "_mask"]
    if hook._stamp == (orig.data_ptr(), orig._version, mask.data_ptr(), mask._version):
        return orig.detach()
    return orig.detach() * mask


def _current_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The bool mask of an already-pruned tensor, None if not pruned."""
    return module._buffers[name + "_mask"] if _find_hook(module, name) is not None else None


def _global_masks_concat(method: BasePruningMethod, scores: list[torch.Tensor], active: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Any unstructured method, the way torch does it: on all scores concatenated."""
    flat = torch.cat([s.reshape(-1) for s in scores])  # [total]
    default = torch.cat([
        torch.ones(s.numel(), dtype=torch.bool, device=s.device) if a is None else a.reshape(-1)
        for s, a in zip(scores, active)
    ])
    container = PruningContainer(method)
    mask = container.compute_mask(flat, default)
    out, offset = [], 0
    for s in scores:
        out.append(mask[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def global_unstructured(parameters: Iterable[tuple[nn.Module, str]], pruning_method: type[BasePruningMethod], importance_scores: dict | None = None, **kwargs: Any) -> None:
    """Prune the given tensors together: ``amount`` of all their unpruned entries, chosen globally.

    With :class:`L1Unstructured` the threshold is found by exact radix selection over the
    tensors one at a time (no concatenated copy of the scores); any other 'unstructured'
    method is run on the concatenated scores, as torch does. Each tensor then carries a
    :class:`CustomFromMask` hook with its slice of the mask, as in torch.
    """
    targets = _global_targets(parameters, importance_scores)
    where = _global_where(targets)
    if not (isinstance(pruning_method, type) and issubclass(pruning_method, BasePruningMethod)):
        raise TypeError(f"{where}: pruning_method must be a prunescope.prune.BasePruningMethod subclass")
    method = _with_context(where, pruning_method, **kwargs)
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError(f"{where}: only 'unstructured' methods can prune globally, {pruning_method.__name__} is {method.PRUNING_TYPE!r}")
    active = [_current_mask(m, n) for m, n, _, _ in targets]
    scores = [s.detach() for _, _, _, s in targets]
    if type(method).compute_mask is L1Unstructured.compute_mask:
        n_left = sum(s.numel() if a is None else int(a.sum()) for s, a in zip(scores, active))
        k = _with_context(f"{where} ({n_left} entries unpruned)", _n_to_prune, method.amount, n_left)
        new_masks = masks.keep_smallest(scores, k, magnitude=True, active=active)
    else:
        method._tensor_name = "global"
        new_masks = _with_context(where, _global_masks_concat, method, scores, active)
    with masks.one_cpu_thread():  # one short in-place multiply per tensor
        for (module, name, _, _), mask in zip(targets, new_masks):
            _install_global(module, name, mask)


def _install_global(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Commit one tensor's slice of a global mask as a CustomFromMask (in a container if needed)."""
    method = CustomFromMask(mask)
    method._tensor_name = name
    key = _find_hook(module, name)
    if key is not None:
        old = module._forward_pre_hooks[key]
        if isinstance(old, PruningContainer):
            old.add_pruning_method(method)
            method = old
        else:
            method = PruningContainer(old, method)
    _install(module, name, method, mask)
