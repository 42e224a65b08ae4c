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

import warnings
from collections.abc import Hashable, Iterable, Mapping
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
    distributed_report,
    resolve,
)
from guided_descent.optimizers.diagnostics import adam_step_rms
from guided_descent.optimizers.guard import (
    GuardedOptimizer,
)
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.routing import FALLBACK, route, split_by_ndim

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


def build_groups(
    target: nn.Module | Iterable[Any],
    algorithm: str,
    routing: Mapping[str, str] | None,
    min_ndim: int = 2,
) -> list[Any]:
    """Param groups for a hybrid optimizer from a model (routed) or a parameter list."""
    if isinstance(target, nn.Module):
        return route(target, algorithm, routing).param_groups()
    if routing:
        raise ValueError("routing overrides need the model (they match parameter names)")
    items = list(target)
    if items and all(isinstance(p, Tensor) for p in items):
        return split_by_ndim(items, algorithm, min_ndim)
    return items


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
    """Steps since the last complete refresh recorded under ``state[key]`` (``None``: never)."""
    refreshed = state.get(key)
    if refreshed is None or "step" not in state:
        return None
    return int(state["step"]) - int(refreshed)


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

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        adamw: dict[str, Any],
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
    ) -> None:
        validate_hyperparams(f"{self.ALGORITHM} (adamw groups)", adamw)
        self._init_guard(on_nonfinite)
        self._adamw_defaults = dict(adamw)
        # Kept out of param_groups: a process group is neither a hyper-parameter nor picklable.
        self.work_split = resolve(distributed)
        super().__init__(params, {**defaults, "algorithm": self.ALGORITHM})

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
            params = group.pop("params")
            params = [params] if isinstance(params, Tensor) else list(params)
            for part in split_by_ndim(params, self.ALGORITHM, self.MIN_NDIM):
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
            self.check_group(owner, {**self.defaults, **group})
            small = [tuple(p.shape) for p in group["params"] if p.dim() < self.MIN_NDIM]
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
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        pairs = ((p, g) for g in self.param_groups for p in g["params"])
        for saved_id, (p, group) in zip(saved_ids, pairs, strict=True):
            if group["algorithm"] == FALLBACK or saved_id not in state_dict["state"]:
                continue
            state = self.state[p]
            for key, value in state_dict["state"][saved_id].items():
                if key != "step":
                    state[key] = _saved_copy(value, p.device)

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            if group["algorithm"] == FALLBACK:
                self._adamw_step(group)
            else:
                self.matrix_step(group)

    def matrix_step(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        torch_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
