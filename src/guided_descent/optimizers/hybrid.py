"""One optimizer, two update rules: a matrix method for some param groups, AdamW for the rest.

Muon, Shampoo and SOAP are built on :class:`HybridOptimizer`. Each param group carries an
``"algorithm"`` key: the subclass's :attr:`~HybridOptimizer.ALGORITHM` (``"muon"``, ...) or
``"adamw"``. Because both kinds are ordinary ``param_groups`` of one ``torch.optim.Optimizer``,
learning-rate schedulers drive both (keeping their ratio), ``state_dict`` round-trips as usual,
and training frameworks see a single optimizer.

The AdamW groups are updated by torch's own functional ``torch.optim.adamw.adamw`` with torch's
state names (``step``, ``exp_avg``, ``exp_avg_sq``), so they behave exactly like
``torch.optim.AdamW``.

The base also carries the library's guard
(:class:`~guided_descent.optimizers.guard.GuardedOptimizer`: non-finite gradients, versioned state
dict, ``diagnostics()``) and the bookkeeping shared by the matrix methods' failure handling: a
failed matrix function keeps the previous preconditioner, is counted in the parameter's state and
warns once per parameter (:func:`warn_failure`); the step of the last complete refresh is kept
(:func:`mark_refreshed`) so that ``diagnostics()`` reports the preconditioner's age, and the
condition numbers of the latest refresh are kept for it too (:meth:`observe_condition`).

**Several processes.** The base holds the optimizer's :class:`~guided_descent.distributed.WorkSplit`
(``distributed=``: see :func:`guided_descent.distributed.resolve`), used by the subclasses to
split their matrix work between replicas (DDP), and creates on first use the split over the
device mesh of FSDP2-sharded (DTensor) parameters (:meth:`HybridOptimizer.sharded_split`). The
AdamW groups need neither: torch's AdamW runs on DTensor shards as they are.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as torch_adamw

from guided_descent.distributed.dtensor import is_dtensor, mesh_group
from guided_descent.distributed.split import (
    Distributed,
    SplitStats,
    WorkSplit,
    auto,
    distributed_report,
    resolve,
)
from guided_descent.optimizers.diagnostics import adam_step_rms
from guided_descent.optimizers.guard import (
    GuardedOptimizer,
)
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.views import FLATTEN, matrix_shape
from guided_descent.routing import (
    FALLBACK,
    Router,
    RoutingPolicy,
    RoutingTable,
    policy_for,
    split_by_ndim,
)
from guided_descent.transforms.masking import bias_correction, commit_, count_

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_ADAMW_GROUP_KEYS = {*ADAMW_KEYS, "params", "algorithm"}


def adamw_defaults(
    lr: float | None,
    betas: tuple[float, float] | None,
    eps: float | None,
    weight_decay: float | None,
    *,
    inherit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The AdamW groups' defaults; with ``inherit`` (the matrix defaults), a ``None`` takes the
    matrix method's value of the same name (Shampoo and SOAP share their Adam settings)."""
    given = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    out = {k: (inherit[k] if v is None and inherit is not None else v) for k, v in given.items()}
    out["betas"] = tuple(out["betas"])
    return out


def plan_groups(
    target: nn.Module | Iterable[Any],
    algorithm: str,
    routing: Mapping[str, str] | None,
    *,
    policy: RoutingPolicy | None = None,
    example_inputs: Any = None,
) -> tuple[list[Any], Router | None]:
    """Param groups for a hybrid optimizer, and the :class:`Router` when ``target`` is a model.

    A model is routed by :func:`~guided_descent.routing.route` (final once a forward pass has
    been seen, see :class:`Router`). A list of parameters, or of ``(name, parameter)`` pairs, is
    split by shape as :meth:`HybridOptimizer.add_param_group` splits untagged groups; names allow
    ``routing`` overrides. Param-group dicts pass through.
    """
    policy = policy_for(algorithm) if policy is None else policy
    if isinstance(target, nn.Module):
        router = Router(target, algorithm, routing, policy, example_inputs)
        return router.table.param_groups(), router
    if example_inputs is not None:
        raise ValueError("example_inputs need the model: pass the nn.Module, not its parameters")
    items = list(target)
    named = bool(items) and all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Tensor) for x in items
    )
    if routing and not named:
        raise ValueError(
            "routing overrides match parameter names: pass the model or named_parameters()"
        )
    if not (named or (items and all(isinstance(p, Tensor) for p in items))):
        return items, None  # param-group dicts (or whatever torch will reject with its message)
    min_ndim = 0 if policy.vectors else 2
    if routing:
        groups = _named_overrides(items, algorithm, dict(routing), min_ndim)
    else:
        groups = split_by_ndim(items, algorithm, min_ndim)
    params = [x[1] if named else x for x in items]
    if min_ndim and any(p.dim() < 2 for p in params) and any(p.dim() >= 2 for p in params):
        # Only what the policy would have sent elsewhere can be misrouted by shape alone.
        unseen = "an embedding" if policy.head else "an output head or embedding"
        warnings.warn(
            f"{algorithm}: given parameters, not the model, so they are split by shape alone "
            f"(>= 2-D to {algorithm}, the rest to {FALLBACK}); {unseen} "
            f"among them cannot be recognised and goes to {algorithm}. Pass the nn.Module to "
            "route by structure, or named_parameters() with routing= to set it by name",
            UserWarning,
            stacklevel=3,
        )
    return groups, None


def _named_overrides(
    items: list[tuple[str, Tensor]], algorithm: str, routing: dict[str, str], min_ndim: int
) -> list[dict[str, Any]]:
    for pattern, target in routing.items():
        if target not in (algorithm, FALLBACK):
            raise ValueError(
                f"routing override {pattern!r} -> {target!r}: the target must be "
                f"{algorithm!r} or {FALLBACK!r}"
            )
    chosen: dict[str, list[tuple[str, Tensor]]] = {algorithm: [], FALLBACK: []}
    for name, p in items:
        matched = next((pat for pat in routing if fnmatch.fnmatchcase(name, pat)), None)
        if matched is not None:
            chosen[routing[matched]].append((name, p))
        else:
            chosen[algorithm if p.dim() >= min_ndim else FALLBACK].append((name, p))
    return [
        {"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs], "algorithm": a}
        for a, pairs in chosen.items()
        if pairs
    ]


def routed_factory(cls: type[HybridOptimizer], name: str, doc: str) -> Callable[..., Any]:
    """The registry's factory for the hybrid optimizer ``cls``: ``name(target, **hyperparams)``.

    ``target`` is a model (routed by :func:`plan_groups`: ``routing`` overrides by name,
    ``routing_policy`` for what the method takes, ``example_inputs`` to settle the routing at
    once) or parameters / param groups. Its keyword arguments are ``cls``'s -- the signature is
    built from the class, so the two never drift apart -- and ``distributed=None`` splits the
    work when ``target`` is a ``DistributedDataParallel`` module.
    """
    hyper = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "params", "router")
    ]
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
        for n, a in (
            ("routing", "Mapping[str, str] | None"),
            ("routing_policy", "RoutingPolicy | None"),
            ("example_inputs", "Any"),
        )
    ]
    target = inspect.Parameter(
        "target", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module | Iterable[Any]"
    )

    def factory(
        target: Any,
        *,
        routing: Mapping[str, str] | None = None,
        routing_policy: RoutingPolicy | None = None,
        example_inputs: Any = None,
        **hyperparams: Any,
    ) -> HybridOptimizer:
        groups, router = plan_groups(
            target, cls.ALGORITHM, routing, policy=routing_policy, example_inputs=example_inputs
        )
        hyperparams["distributed"] = auto(hyperparams.get("distributed"), target)
        return cls(groups, **hyperparams, router=router)

    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [target, *hyper, *extra], return_annotation=cls.__name__
    )
    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = cls.__module__
    factory.__doc__ = doc
    return factory


def build_groups(
    target: nn.Module | Iterable[Any],
    algorithm: str,
    routing: Mapping[str, str] | None,
    min_ndim: int = 2,
) -> list[Any]:
    """The param groups of :func:`plan_groups` (without the router)."""
    del min_ndim  # one shape rule for every method now: see HybridOptimizer.add_param_group
    return plan_groups(target, algorithm, routing)[0]


def warn_failure(
    owner: str, state: dict[str, Any], key: str, shape: tuple[int, ...], what: str
) -> None:
    """Count a failed matrix function in ``state[key]``; warn the first time for this parameter."""
    if state[key] == 0:
        warnings.warn(
            f"{owner}: {what} failed for the parameter of shape {shape}; keeping its previous "
            f"preconditioner (warned once per parameter; failures are counted in state[{key!r}])",
            RuntimeWarning,
            stacklevel=5,
        )
    state[key] += 1


def _saved_copy(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or a list/tuple of them) copied to ``device`` in its saved dtype."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_saved_copy(v, device) for v in value)
    return value


def mark_refreshed(
    refreshed: Iterable[tuple[Tensor, dict[str, Any]]], failed: set[int], key: str
) -> None:
    """``state[key] = step`` for each refreshed (parameter, state) none of whose factors failed
    (``failed``: ids of parameters with a failure): its preconditioner is entirely new."""
    for p, state in refreshed:
        if id(p) not in failed:
            state[key] = int(state["step"].item())


def refresh_age(state: Mapping[str, Any], key: str) -> int | None:
    """Steps since the last complete refresh recorded under ``state[key]`` (``None``: never).

    A sync-free step records it as a tensor, -1 before the first complete refresh."""
    refreshed = state.get(key)
    if refreshed is None or "step" not in state or int(refreshed) < 0:
        return None
    return int(state["step"]) - int(refreshed)


def mark_refreshed_on_device(
    done: Iterable[tuple[Tensor, dict[str, Any], Tensor]], key: str
) -> None:
    """:func:`mark_refreshed` for a sync-free step: ``done`` holds (parameter, state, committed)
    per result, ``committed`` a 0-d bool tensor; ``state[key]`` becomes the step tensor where all
    of a parameter's results were committed (-1 before any complete refresh)."""
    merged: dict[int, tuple[dict[str, Any], Tensor]] = {}
    for p, state, committed in done:
        if id(p) in merged:
            committed = committed & merged[id(p)][1]
        merged[id(p)] = (state, committed)
    for state, committed in merged.values():
        step = state["step"].to(torch.int64)
        before = state.get(key)
        if not isinstance(before, Tensor):
            before = torch.full_like(step, -1 if before is None else int(before))
        state[key] = torch.where(committed, step, before)


def counter(state: dict[str, Any], key: str) -> Tensor:
    """``state[key]`` as a 0-d int64 tensor on the step's device, converted in place from the
    host int an older state dict may hold (so that a sync-free step can add to it)."""
    value = state[key]
    if not isinstance(value, Tensor):
        device = state["step"].device if isinstance(state.get("step"), Tensor) else None
        value = state[key] = torch.tensor(int(value), dtype=torch.int64, device=device)
    return value


class HybridOptimizer(GuardedOptimizer, torch.optim.Optimizer):
    """Base class: the subclass's matrix update for its groups, torch's AdamW for ``"adamw"``.

    Subclasses set :attr:`ALGORITHM`, implement :meth:`matrix_step` and may override
    :meth:`check_group` to validate their own hyper-parameters. Groups given without an
    ``"algorithm"`` key are split by dimension: ``MIN_NDIM``-D and larger parameters go to the
    matrix method, smaller ones to AdamW. AdamW groups take their missing hyper-parameters from
    ``adamw`` (not from the matrix method's defaults).
    """

    ALGORITHM: ClassVar[str]
    MIN_NDIM: ClassVar[int] = 2

    # Class-level defaults: a copy rebuilt from torch's __getstate__ has no process group.
    work_split: WorkSplit | None = None
    _sharded: WorkSplit | None = None
    _own_stats: SplitStats | None = None
    router: Router | None = None
    # Whether the free update function runs compiled (see optimizers.compiled); set by the
    # methods that offer ``compile_update``.
    compile_update: bool = False

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        adamw: dict[str, Any],
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
        router: Router | None = None,
    ) -> None:
        validate_hyperparams(f"{self.ALGORITHM} (adamw groups)", adamw)
        self._init_guard(on_nonfinite)
        self._adamw_defaults = dict(adamw)
        # Kept out of param_groups: a process group is neither a hyper-parameter nor picklable.
        self.work_split = resolve(distributed)
        super().__init__(params, {**defaults, "algorithm": self.ALGORITHM})
        self._place_counters(None)  # before any compiled step, which could not create them
        self.router = router
        if router is not None:
            if router.final:
                self._check_routed()
            else:
                ref = weakref.ref(self)

                def on_final(table: RoutingTable) -> None:
                    opt = ref()
                    if opt is not None:
                        opt._apply_routing(table)

                router.watch(on_final)

    # ------------------------------------------------------------------------------ routing

    @property
    def routing(self) -> RoutingTable | None:
        """The routing table this optimizer applies (``None`` when built from parameters).

        Provisional until the model's first forward pass with gradients (or the first step)."""
        return None if self.router is None else self.router.table

    def _group_key(self, group: Mapping[str, Any]) -> tuple[str, str | None]:
        algorithm = group["algorithm"]
        view = group.get("matrix_view") if algorithm == self.ALGORITHM else None
        return algorithm, view

    def _apply_routing(self, table: RoutingTable) -> None:
        """Move parameters between this optimizer's groups to follow ``table`` (before any
        state exists: a finalized routing only ever changes an optimizer that has not stepped)."""
        if self._steps or self.state:
            return
        by_key = {self._group_key(g): g for g in self.param_groups}
        where = {id(p): g for g in self.param_groups for p in g["params"]}
        for r in table.routes:
            p = table.parameter(r.name)
            target = by_key.get(table.key(r))
            current = where.get(id(p))
            if target is None or current is None or target is current:
                continue
            i = next(j for j, q in enumerate(current["params"]) if q is p)
            del current["params"][i]
            if "param_names" in current:
                del current["param_names"][i]
            target["params"].append(p)
            if "param_names" in target:
                target["param_names"].append(r.name)
        self._check_routed()

    def _check_routed(self) -> None:
        table = self.routing
        if table is None or table.count(self.ALGORITHM):
            return
        adamw_lr = self._adamw_defaults["lr"]
        warnings.warn(
            f"{self.ALGORITHM}: no parameter of the model is routed to {self.ALGORITHM} (see "
            f"optimizer.routing); all {len(table.routes)} go to {FALLBACK} at lr={adamw_lr:g}, "
            f"so {self.ALGORITHM}'s own lr has no effect. Use routing={{name: "
            f"{self.ALGORITHM!r}}} to send a parameter to it",
            UserWarning,
            stacklevel=4,
        )

    def _before_update(self) -> None:
        router = self.router
        if router is None or router.final:
            return
        for note in router.settle(None):
            warnings.warn(note, UserWarning, stacklevel=4)
        self._apply_routing(router.table)

    @property
    def split_stats(self) -> SplitStats:
        """What this rank computed and exchanged (shared by the replicated and sharded splits)."""
        if self.work_split is not None:
            return self.work_split.stats
        if self._own_stats is None:
            self._own_stats = SplitStats()
        return self._own_stats

    def sharded_split(self) -> WorkSplit:
        """The split over the device mesh of this optimizer's FSDP2-sharded parameters."""
        if self._sharded is None:
            params = [p for group in self.param_groups for p in group["params"]]
            self._sharded = WorkSplit(mesh_group(params), stats=self.split_stats)
        return self._sharded

    def _extra_diagnostics(self) -> dict[str, Any]:
        return distributed_report(self.state, [self.work_split, self._sharded])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        algorithm = group.get("algorithm")
        owner = f"{self.ALGORITHM} (param group {len(self.param_groups)})"
        if algorithm is None:
            # One rule for every method and for every way of passing parameters: what the
            # routing policy sends to the matrix method by shape (>= 2-D; vectors only when the
            # policy takes them), the rest to AdamW.
            params = group.pop("params")
            params = [params] if isinstance(params, Tensor) else list(params)
            policy = self.router.policy if self.router is not None else policy_for(self.ALGORITHM)
            for part in split_by_ndim(params, self.ALGORITHM, 0 if policy.vectors else 2):
                self.add_param_group({**group, **part})
            return
        validate_hyperparams(owner, group)
        if algorithm == FALLBACK:
            for key in ADAMW_KEYS:
                group.setdefault(key, self._adamw_defaults[key])
        elif algorithm != self.ALGORITHM:
            raise ValueError(
                f"param group algorithm must be {self.ALGORITHM!r} or {FALLBACK!r}, "
                f"got {algorithm!r}"
            )
        else:
            merged = {**self.defaults, **group}
            self.check_group(owner, merged)
            view = merged.get("matrix_view", FLATTEN)
            raw = group["params"]
            group["params"] = raw = [raw] if isinstance(raw, Tensor) else list(raw)
            tensors = [x[1] if isinstance(x, tuple) else x for x in raw]
            for p in tensors:
                if p.dim() >= 2:
                    try:
                        matrix_shape(p.shape, view)
                    except ValueError as err:
                        raise ValueError(f"{owner}: {err}") from None
            small = [tuple(p.shape) for p in tensors if p.dim() < self.MIN_NDIM]
            if small:
                raise ValueError(
                    f"{self.ALGORITHM} needs parameters with >= {self.MIN_NDIM} dimensions; "
                    f"got shapes {small} in a group marked {self.ALGORITHM!r} (send them to "
                    f"{FALLBACK!r})"
                )
        super().add_param_group(group)
        if algorithm == FALLBACK:
            # torch fills every default of the matrix method into each group; an AdamW group
            # needs none of them, and leaving them would clutter its state_dict.
            added = self.param_groups[-1]
            for key in [k for k in added if k in self.defaults and k not in _ADAMW_GROUP_KEYS]:
                del added[key]

    def check_group(self, owner: str, group: Mapping[str, Any]) -> None:
        """Checks across a matrix group's keys (``group`` has the defaults filled in); the keys
        one at a time are checked by ``validation.CHECKS``."""

    def expected_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        if group["algorithm"] == FALLBACK:
            keys = ("step", "exp_avg", "exp_avg_sq")
            return keys, {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        return self.matrix_state(p, group)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        """:meth:`expected_state` for a parameter of a matrix group."""
        return (), {}

    def _param_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        if group["algorithm"] == FALLBACK:
            state = self.state.get(p)
            value = adam_step_rms(p, group, state) if state else None
            if is_dtensor(value):
                # FSDP2: the RMS of a sharded update is a partial sum on each rank; reduce it
                # (a collective: under FSDP2 every rank calls diagnostics()).
                value = value.full_tensor()
            return {"update_rms": value}
        return {**super()._param_diagnostics(p, group), **self.matrix_diagnostics(p, group)}

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        """Diagnostics of a parameter of a matrix group beyond the recorded update RMS."""
        return {}

    def restore_counts(self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Fill the host-side counters (``state["calls"]``) of a state loaded from a state dict
        saved before they existed; methods without such counters do nothing."""

    def observe_condition(self, p: Tensor, factor: Hashable, condition: Tensor) -> None:
        """Keep the condition number of one of ``p``'s factors from its latest refresh."""
        conditions = self._observation(p).get("conditions", {})
        conditions[factor] = condition
        self._observe(p, conditions=conditions)

    def worst_condition(self, p: Tensor) -> Tensor | None:
        """The largest kept condition number over ``p``'s factors (``None``: none kept)."""
        conditions = self._observation(p).get("conditions")
        return torch.stack(list(conditions.values())).amax() if conditions else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then the matrix groups' state restored in the dtype it was saved in.

        ``Optimizer.load_state_dict`` casts floating state to the parameter's dtype. Matrix
        methods keep their statistics in float32 even for bfloat16 parameters; cast to bfloat16
        they would lose what they keep and a resumed run would drift from an uninterrupted one.
        AdamW groups keep torch's semantics.
        """
        self._follow_saved_routing(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        pairs = ((p, g) for g in self.param_groups for p in g["params"])
        for saved_id, (p, group) in zip(saved_ids, pairs, strict=True):
            if group["algorithm"] == FALLBACK or saved_id not in state_dict["state"]:
                continue
            state = self.state[p]
            for key, value in state_dict["state"][saved_id].items():
                # The step too: a sync-free step updates it on the parameter's device.
                state[key] = _saved_copy(value, p.device)
            if "step" in state and "calls" not in state:
                # Saved before the host kept its own count of steps, or through a path that keeps
                # tensors only (DCP): derive it from the state.
                self.restore_counts(p, group, state)

    def _follow_saved_routing(self, state_dict: Mapping[str, Any]) -> None:
        """Give the groups the membership the state dict was saved with, by parameter name.

        A routed optimizer may have moved parameters between its groups after its first forward
        pass; one built afresh to resume has not yet. torch loads state by position within each
        group, so the saved membership is restored first (then the routing is final).
        """
        saved = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if self.router is None or not isinstance(saved, list) or len(saved) != len(
            self.param_groups
        ):
            return
        current = [g.get("param_names") for g in self.param_groups]
        wanted = [g.get("param_names") if isinstance(g, Mapping) else None for g in saved]
        if any(names is None for names in current + wanted):
            return
        by_name = {
            n: p
            for g in self.param_groups
            for n, p in zip(g["param_names"], g["params"], strict=True)
        }
        if sorted(by_name) != sorted(chain.from_iterable(wanted)):
            return  # not this model's parameters: check_state_dict says what differs
        for group, names in zip(self.param_groups, wanted, strict=True):
            group["params"] = [by_name[n] for n in names]
            group["param_names"] = list(names)
        self.router.adopt(
            {n: self._group_key(g) for g in self.param_groups for n in g["param_names"]}
        )

    def _can_mask(self) -> bool:
        # The work split between ranks and the FSDP2 owner protocol read results on the host.
        if self.work_split is not None:
            return False
        return not any(is_dtensor(p) for g in self.param_groups for p in g["params"])

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the missing state of ``group``'s parameters that have a gradient.

        Under ``torch.compile`` dynamo runs a method of this name eagerly instead of tracing it
        (as for torch's own optimizers), so that state tensors are real tensors rather than
        values created inside the compiled graph -- inductor has mis-compiled an EMA started from
        in-graph zeros (``zeros.lerp(a @ b, w)`` gave ``a @ b``). Sync-free steps call it first.
        """
        for p in group["params"]:
            if p.grad is None or self.state.get(p):
                continue
            if group["algorithm"] == FALLBACK:
                self._init_adamw_state(p)
            else:
                self.init_matrix_state(p, group)

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        """Create the state of ``p`` in a matrix group (see :meth:`_init_group`)."""

    def _init_adamw_state(self, p: Tensor) -> None:
        state = self.state[p]
        # torch's convention: a CPU step for its CPU kernels, on the device for the fused kernel
        # that a sync-free step uses on accelerators.
        device = p.device if p.device.type != "cpu" else None
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def _update(self, ok: Tensor | None = None) -> None:
        if self._sync_free_step:
            for group in self.param_groups:
                self._init_group(group)
        for group in self.param_groups:
            if group["algorithm"] == FALLBACK:
                self._adamw_step(group, ok)
            elif ok is None:
                self.matrix_step(group)  # a subclass without MASKED_SKIP takes no flag
            else:
                self.matrix_step(group, ok)

    def matrix_step(self, group: dict[str, Any], ok: Tensor | None = None) -> None:
        """One step of the matrix method on ``group``; with ``ok`` (a 0-d bool tensor), only
        where it is true, leaving parameters and state bit-identical otherwise (no host sync).
        Only subclasses that set :attr:`MASKED_SKIP` are given ``ok``."""
        raise NotImplementedError

    def _adamw_step(self, group: dict[str, Any], ok: Tensor | None = None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                self._init_adamw_state(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        hyper = dict(
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )
        if ok is not None and torch.compiler.is_compiling():
            # torch does not trace its fused kernel; the same arithmetic, kept where ok.
            _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, ok, **hyper)
            return
        # A sync-free step uses torch's fused kernel, which skips the whole update -- moments,
        # parameters and the step count -- on its device when found_inf is set (as GradScaler
        # does); a host-decided step uses torch.optim.AdamW's default kernel, exactly.
        masked = ok is not None
        # On CPU torch's default is its per-tensor loop; its foreach kernel does the same
        # element-wise arithmetic in the same order (bit-identical to torch.optim.AdamW:
        # tests/test_routing.py) in one call per operation instead of one per parameter
        # (4 small tensors: 121 -> 104 us).
        on_cpu = all(p.device.type == "cpu" and not is_dtensor(p) for p in params)
        foreach = True if on_cpu and not masked else None
        torch_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=foreach,
            fused=True if masked else None,
            found_inf=(~ok).to(torch.float32) if masked else None,
            amsgrad=False,
            maximize=False,
            **hyper,
        )


def _masked_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    ok: Tensor,
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
) -> None:
    """AdamW's update (``torch.optim.AdamW``'s formula) committed only where ``ok``: the path a
    compiled sync-free step takes, since torch does not trace its fused kernel."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        count_(step, ok)
        new_m = m.lerp(g, 1.0 - beta1)
        new_v = v.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
        bias1 = bias_correction(beta1, step)
        bias2 = bias_correction(beta2, step)
        denom = (new_v.sqrt() / bias2.sqrt()).add_(eps)
        new_p = p.mul(1.0 - lr * weight_decay) - lr * (new_m / bias1) / denom
        commit_(m, new_m, ok)
        commit_(v, new_v, ok)
        commit_(p, new_p, ok)
