"""Other libraries' optimizers, run side by side with ours under the same model, data and schedule.

Optional: a peer whose package is not installed is skipped with a note, never an error
(``pip install 'guided-descent[peers]'`` installs heavyball and pytorch_optimizer;
``torch.optim.Muon`` needs torch >= 2.9). The adapters read each library's current API (both
change often); they were written against heavyball 3.2.1 and pytorch_optimizer 4.1.0.

**Same parameters, same split.** A peer gets exactly the parameters our router
(:func:`guided_descent.routing.route`) sends to a matrix method -- the hidden ``Linear``/``Conv``
weights -- and everything else (embeddings, the output head, norms, biases) goes to
``torch.optim.AdamW`` with the hyper-parameters our counterpart uses for those parameters (read
from the optimizer ``guided_descent.create(counterpart, model)`` builds, so they cannot drift).
The comparison is then between the matrix updates alone. :class:`Chain` steps the two optimizers
as one, and exposes their param groups (the very same dicts) so that a learning-rate schedule
drives both.

**Each peer at its library's defaults** (its "recommended" hyper-parameters), except that
heavyball's ``torch.compile`` of the optimizer step follows our ``--compile`` flag: heavyball
compiles by default (``heavyball.utils.compile_mode``), which on a CPU costs tens of seconds of
compilation per optimizer and recompiles as state shapes change, so eager is the fair CPU
comparison with our (eager) optimizers. :func:`heavyball_compile` sets and restores it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from torch import Tensor, nn

import guided_descent as gd
from guided_descent.routing import FALLBACK, route


class PeerUnavailable(RuntimeError):
    """The peer's package is not installed (or lacks the class); the message says which."""


@dataclass(frozen=True)
class Peer:
    """One other-library optimizer.

    ``build(hidden, model)`` returns the optimizer for the hidden matrices; ``counterpart`` is
    the registry name whose AdamW settings the remaining parameters get; ``matrix_only``: the
    class takes 2-D parameters only (other hidden weights, e.g. convolution kernels, then go to
    AdamW as well, and the report says so).
    """

    name: str
    package: str  # the distribution to import and report the version of
    qualname: str  # module.Class, for the report
    counterpart: str
    build: Callable[[list[Tensor]], torch.optim.Optimizer]
    matrix_only: bool = False
    note: str = ""
    # The same algorithm as ``counterpart`` (a like-for-like comparison of implementations);
    # False for a different method that only borrows the counterpart's AdamW settings.
    same_algorithm: bool = True


def _class(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        obj = None
    if obj is None:
        raise PeerUnavailable(f"{qualname} is not available (is {module.split('.')[0]} installed?)")
    return obj


def _torch_muon(hidden: list[Tensor]) -> torch.optim.Optimizer:
    return _class("torch.optim.Muon")(hidden)


def _default_ctor(qualname: str) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    def build(hidden: list[Tensor]) -> torch.optim.Optimizer:
        return _class(qualname)(hidden)

    return build


def _pto_muon(hidden: list[Tensor]) -> torch.optim.Optimizer:
    # pytorch_optimizer's Muon wants groups flagged use_muon; its own AdamW groups are not used
    # here (the rest goes to torch AdamW like every other peer's).
    return _class("pytorch_optimizer.Muon")([{"params": hidden, "use_muon": True}])


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("torch-muon", "torch", "torch.optim.Muon", "muon", _torch_muon, matrix_only=True,
             note="2-D matrices only; bfloat16 Newton-Schulz"),
        Peer("heavyball-muon", "heavyball", "heavyball.Muon", "muon",
             _default_ctor("heavyball.Muon")),
        Peer("heavyball-soap", "heavyball", "heavyball.SOAP", "soap",
             _default_ctor("heavyball.SOAP")),
        Peer("heavyball-klshampoo", "heavyball", "heavyball.KLShampoo", "kl_shampoo",
             _default_ctor("heavyball.KLShampoo"),
             note="KL-Shampoo (arXiv 2509.03378); heavyball reads the eigenvalues off the "
             "factor in the current basis and seeds the factors with 0.1·I"),
        Peer("heavyball-psgd", "heavyball", "heavyball.PSGDKron", "psgd_kron",
             _default_ctor("heavyball.PSGDKron"),
             note="PSGD Kron; heavyball's own fit schedule (flat 1000 steps, then 0.999^n) and "
             "elementwise update clipping"),
        Peer("pto-muon", "pytorch_optimizer", "pytorch_optimizer.Muon", "muon", _pto_muon),
        Peer("pto-soap", "pytorch_optimizer", "pytorch_optimizer.SOAP", "soap",
             _default_ctor("pytorch_optimizer.SOAP")),
        Peer("pto-shampoo", "pytorch_optimizer", "pytorch_optimizer.Shampoo", "shampoo",
             _default_ctor("pytorch_optimizer.Shampoo"),
             note="the original Shampoo: inverse roots every step, no grafting"),
        Peer("pto-psgd", "pytorch_optimizer", "pytorch_optimizer.Kron", "psgd_kron",
             _default_ctor("pytorch_optimizer.Kron"),
             note="PSGD Kron; random fits, initial scale 1 (ours: from the first gradient)"),
    )
}


def is_peer(name: str) -> bool:
    return name in PEERS


def version(package: str) -> str | None:
    """The installed version of ``package`` (``None`` when it is not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def availability(name: str) -> str | None:
    """``None`` when peer ``name`` can run here, else the reason it cannot (one line)."""
    peer = PEERS[name]
    module, _, cls = peer.qualname.rpartition(".")
    top = module.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return f"{peer.package} is not installed (pip install {peer.package})"
    except (ImportError, ValueError):
        return f"{peer.package} is not installed (pip install {peer.package})"
    try:
        _class(peer.qualname)
    except PeerUnavailable as e:
        return str(e)
    return None


class Chain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one.

    ``param_groups`` is the concatenation of the parts' groups -- the same dict objects -- so an
    LR scheduler, ``zero_grad`` and gradient clipping see and drive every part. Step hooks of
    this object time the whole step.
    """

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        if not parts:
            raise ValueError("Chain needs at least one optimizer")
        params = [p for o in parts for g in o.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("Chain: a parameter belongs to two parts")
        super().__init__(params, {})
        self.parts = list(parts)
        self.param_groups = [g for o in self.parts for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, s in zip(self.parts, state_dict["parts"], strict=True):
            o.load_state_dict(s)


def _adamw_settings(counterpart: str, model: nn.Module) -> dict[str, Any]:
    """The AdamW hyper-parameters our ``counterpart`` gives the parameters it routes out."""
    probe = gd.create(counterpart, model)
    for group in probe.param_groups:
        if group.get("algorithm", FALLBACK) == FALLBACK:
            return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
    raise RuntimeError(f"{counterpart} routed nothing to AdamW; cannot copy its settings")


@dataclass
class Built:
    """A peer's optimizer and what it was given."""

    optimizer: torch.optim.Optimizer
    peer_params: int  # parameters updated by the peer itself
    adamw_params: int  # parameters sent to torch AdamW
    note: str


def create(name: str, model: nn.Module) -> Built:
    """Build peer ``name`` for ``model`` (see the module docstring for the split)."""
    peer = PEERS[name]
    reason = availability(name)
    if reason is not None:
        raise PeerUnavailable(reason)
    table = route(model, "matrix")
    named = dict(model.named_parameters())
    hidden = [named[r.name] for r in table.routes if r.algorithm == "matrix"]
    note = peer.note
    if peer.matrix_only:
        kept = [p for p in hidden if p.dim() == 2]
        if len(kept) < len(hidden):
            note = (note + "; " if note else "") + (
                f"{len(hidden) - len(kept)} non-2-D hidden weight(s) sent to AdamW"
            )
        hidden = kept
    if not hidden:
        raise PeerUnavailable(f"{name}: the model has no hidden matrix it can take")
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in named.values() if p.requires_grad and id(p) not in hidden_ids]
    parts = [peer.build(hidden)]
    if rest:
        adamw = torch.optim.AdamW(rest, **_adamw_settings(peer.counterpart, model))
        parts.append(adamw)
    return Built(
        Chain(parts),
        sum(p.numel() for p in hidden),
        sum(p.numel() for p in rest),
        note,
    )


@contextlib.contextmanager
def heavyball_compile(enabled: bool) -> Iterator[None]:
    """Turn heavyball's ``torch.compile`` of optimizer internals on or off, restoring it after."""
    try:
        utils = importlib.import_module("heavyball.utils")
    except ImportError:
        yield
        return
    names = ("compile_mode", "compile_mode_recommended_to_none")
    saved = {n: getattr(utils, n) for n in names if hasattr(utils, n)}
    try:
        if not enabled:
            for n in saved:
                setattr(utils, n, None)
        yield
    finally:
        for n, v in saved.items():
            setattr(utils, n, v)


def versions() -> dict[str, str | None]:
    """Versions of every peer package (``None``: not installed)."""
    return {pkg: version(pkg) for pkg in sorted({p.package for p in PEERS.values()})}


__all__ = [
    "PEERS",
    "Built",
    "Chain",
    "Peer",
    "PeerUnavailable",
    "availability",
    "create",
    "heavyball_compile",
    "is_peer",
    "version",
    "versions",
]
