"""The optimizer registry: one :class:`OptimizerSpec` per name, and :func:`create`.

A spec carries what a user needs to choose an optimizer (family, update rule, state memory,
reference) and what :func:`create` needs to build it (a factory, its recommended defaults and the
hyper-parameters it accepts). New optimizers join by calling :func:`register`; the contract
test-suite then covers them automatically.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from guided_descent.optimizers.validation import validate_hyperparams

FAMILIES = ("sgd", "adaptive", "sign", "layer-wise", "second-order")


class UnknownNameError(ValueError):
    """A name that is not registered; the message lists the known names."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the registry knows about one optimizer.

    ``state_buffers`` is the optimizer state per parameter in units of the parameter's own size
    (Adam keeps two moment buffers: 2.0); ``state`` says the same in words, including any
    per-layer matrices that do not scale with the parameter count. ``needs_model``: the factory
    must get the ``nn.Module`` (it hooks into layers). ``routes``: given a module, the factory
    gets the module so that it can route parameters (see ``guided_descent.routing``); given a
    parameter list, it gets the list.
    """

    name: str
    family: str
    rule: str
    state: str
    state_buffers: float
    reference: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_model: bool = False
    routes: bool = False
    torch_native: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def hyperparams(self) -> tuple[str, ...]:
        """Keyword arguments the factory accepts (besides the parameters / model)."""
        sig = inspect.signature(self.factory)
        skip = {"params", "model", "target", "self"}
        return tuple(
            n
            for n, p in sig.parameters.items()
            if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    def summary(self) -> str:
        """One line for ``guided-descent list``."""
        return f"{self.name:<18} {self.family:<12} {self.rule}"


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def optimizers() -> Mapping[str, OptimizerSpec]:
    """The registry, read-only: name -> :class:`OptimizerSpec`, in registration order."""
    return MappingProxyType(_REGISTRY)


def unknown_name(kind: str, name: object, known: Iterable[str]) -> UnknownNameError:
    """An error for an unknown ``name`` of ``kind`` that lists the known names."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}")


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under ``name``; an :class:`UnknownNameError` lists the names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_name("optimizer", name, _REGISTRY)
    return _REGISTRY[name]


def _split_target(name: str, target: Any) -> tuple[nn.Module | None, list[Any]]:
    """(model or None, list of parameters or param-group dicts) from what the user passed."""
    if isinstance(target, nn.Module):
        params = [p for p in target.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{name}: the model has no trainable parameters")
        return target, params
    if isinstance(target, torch.Tensor):
        raise TypeError(
            f"{name}: expected an nn.Module, an iterable of parameters or of param-group dicts, "
            f"got a single Tensor of shape {tuple(target.shape)}; wrap it in a list"
        )
    if isinstance(target, Mapping) or not isinstance(target, Iterable):
        raise TypeError(
            f"{name}: expected an nn.Module, an iterable of parameters or of param-group dicts, "
            f"got {type(target).__name__}"
        )
    params = list(target)
    if not params:
        raise ValueError(f"{name}: got an empty list of parameters")
    return None, params


def create(name: str, model_or_params: Any, **hyperparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    ``model_or_params`` is an ``nn.Module`` (its trainable parameters are optimized), an iterable
    of parameters, or an iterable of param-group dicts as ``torch.optim`` accepts. Keyword
    arguments override the registry's recommended defaults; unknown ones raise ``TypeError``,
    out-of-range values ``ValueError``. Optimizers that need the model (``needs_model``) must be
    given the ``nn.Module``.
    """
    spec = get_spec(name)
    accepted = spec.hyperparams
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise TypeError(
            f"{name}: unknown hyper-parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted)}"
        )
    model, params = _split_target(name, model_or_params)
    kwargs = {**spec.defaults, **hyperparams}
    validate_hyperparams(name, kwargs)
    for i, group in enumerate(params):
        if isinstance(group, Mapping):
            overrides = {k: v for k, v in group.items() if k != "params"}
            validate_hyperparams(f"{name} (param group {i})", overrides)
    if spec.needs_model:
        if model is None:
            raise TypeError(
                f"{name} needs the model (it hooks into its layers): pass the nn.Module, "
                "not a list of parameters"
            )
        return spec.factory(model, **kwargs)
    if spec.routes and model is not None:
        return spec.factory(model, **kwargs)
    return spec.factory(params, **kwargs)
