"""Which parameter goes to which update rule.

Matrix methods (Muon, Shampoo, SOAP) are meant for the hidden weight matrices of a network. The
practice of their strong users -- and what :func:`route` does by default -- is to send embeddings,
the output head, normalization gains and biases to AdamW:

* the weight of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` goes to the matrix method,
* except the output head (the last ``nn.Linear`` registered in the model) and any weight tied to
  an ``nn.Embedding``;
* everything else (embeddings, norms, biases, free-standing parameters) goes to AdamW.

Name patterns (``fnmatch`` on the parameter's qualified name) override the rules, first match
wins. :class:`RoutingTable` prints as a table and checks that every trainable parameter is routed
exactly once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

FALLBACK = "adamw"
_MATRIX_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


@dataclass(frozen=True)
class Route:
    """One parameter's destination and why."""

    name: str
    shape: tuple[int, ...]
    algorithm: str
    reason: str


class RoutingTable:
    """The routes of one model's parameters, in ``named_parameters`` order."""

    def __init__(self, routes: list[Route], params: Mapping[str, nn.Parameter]) -> None:
        self.routes = routes
        self._params = dict(params)

    def param_groups(self) -> list[dict]:
        """One param group per algorithm (matrix method first), each tagged with ``algorithm``."""
        groups: dict[str, list[nn.Parameter]] = {}
        for r in self.routes:
            groups.setdefault(r.algorithm, []).append(self._params[r.name])
        order = sorted(groups, key=lambda a: a == FALLBACK)
        return [{"params": groups[a], "algorithm": a} for a in order]

    def count(self, algorithm: str) -> int:
        return sum(1 for r in self.routes if r.algorithm == algorithm)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.routes] + [9])
        lines = [f"{'parameter':<{width}}  {'optimizer':<9}  {'shape':<16}  reason"]
        for r in self.routes:
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{width}}  {r.algorithm:<9}  {shape:<16}  {r.reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(parameter) -> (attribute name, owning module), first owner in registration order."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (attr, module))
    return owners


def route(
    model: nn.Module,
    algorithm: str,
    overrides: Mapping[str, str] | None = None,
) -> RoutingTable:
    """Route every trainable parameter of ``model`` to ``algorithm`` or to AdamW.

    ``overrides`` maps ``fnmatch`` patterns on parameter names to ``algorithm`` or ``"adamw"``;
    e.g. ``{"blocks.*.attn.*": "adamw"}``.
    """
    overrides = dict(overrides or {})
    for pattern, target in overrides.items():
        if target not in (algorithm, FALLBACK):
            raise ValueError(
                f"routing override {pattern!r} -> {target!r}: the target must be "
                f"{algorithm!r} or {FALLBACK!r}"
            )
    tied: set[int] = set()
    linears = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            tied.add(id(module.weight))
        if isinstance(module, nn.Linear):
            linears.append(module)
    head = id(linears[-1].weight) if linears else None
    owners = _owners(model)

    params = dict(model.named_parameters())  # shared parameters appear once, by first name
    routes = []
    for name, p in params.items():
        if not p.requires_grad:
            continue
        matched = next((pat for pat in overrides if fnmatch.fnmatchcase(name, pat)), None)
        if matched is not None:
            routes.append(Route(name, tuple(p.shape), overrides[matched], f"override {matched!r}"))
            continue
        attr, owner = owners[id(p)]
        routes.append(Route(name, tuple(p.shape), *_rule(p, attr, owner, tied, head, algorithm)))
    table = RoutingTable(routes, params)
    _check_exactly_once(model, table)
    return table


def _rule(
    p: Tensor, attr: str, owner: nn.Module, tied: set[int], head: int | None, algorithm: str
) -> tuple[str, str]:
    kind = type(owner).__name__
    if isinstance(owner, nn.Embedding):
        return FALLBACK, "embedding"
    if id(p) in tied:
        return FALLBACK, f"{kind} weight tied to an embedding"
    if isinstance(owner, _NORMS):
        return FALLBACK, f"normalization ({kind}) {attr}"
    if attr == "bias":
        return FALLBACK, f"bias of {kind}"
    if isinstance(owner, _MATRIX_MODULES) and attr == "weight" and p.dim() >= 2:
        if id(p) == head:
            return FALLBACK, "output head (last nn.Linear)"
        return algorithm, f"hidden matrix ({kind})"
    return FALLBACK, f"not a Linear/Conv weight ({kind}.{attr}, {p.dim()}-D)"


def _check_exactly_once(model: nn.Module, table: RoutingTable) -> None:
    routed = [id(table._params[r.name]) for r in table.routes]
    if len(routed) != len(set(routed)):
        raise RuntimeError("a parameter was routed twice")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    missing = trainable - set(routed)
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameter(s) were not routed")


def split_by_ndim(params: list[Tensor], algorithm: str, min_ndim: int = 2) -> list[dict]:
    """Groups for a plain parameter list: ``min_ndim``-D and up to ``algorithm``, the rest AdamW."""
    matrix = [p for p in params if p.dim() >= min_ndim]
    rest = [p for p in params if p.dim() < min_ndim]
    groups = []
    if matrix:
        groups.append({"params": matrix, "algorithm": algorithm})
    if rest:
        groups.append({"params": rest, "algorithm": FALLBACK})
    return groups
