"""The step skeleton every Kronecker-factored matrix method shares (Shampoo, SOAP, ...).

A method built on :class:`KroneckerOptimizer` supplies what is its own -- the state of a
parameter (:meth:`~KroneckerOptimizer.init_matrix_state`), the update of a list of (parameter,
full gradient) pairs (:meth:`~KroneckerOptimizer.updates`) and a cost estimate for balancing work
between ranks (:meth:`~KroneckerOptimizer.cost`) -- and inherits the rest:

* collecting the gradients of a matrix group, refusing sparse ones;
* applying each update as soon as it is known, ``W ← W (1 - lr wd) - lr U``, rounding once into
  the parameter's dtype, only where the device flag allows it on a sync-free step;
* a **staggered refresh schedule** (:meth:`~KroneckerOptimizer.refresh_slot`): with
  ``stagger_refresh`` on, each refresh unit (a Shampoo block, a SOAP parameter) gets an offset in
  ``[0, precondition_frequency)``, balanced by cost over the group, so that the inverse roots or
  bases are recomputed a share per step instead of all on one step;
* FSDP2 (DTensor) parameters: each sharded parameter's whole state lives on one owner rank
  (a Kronecker preconditioner needs the full matrix); every rank sends its gradient shard to the
  owner, which computes the update exactly as on one process and sends each rank its shard back,
  with a flag saying whether the parameter moves this step (SOAP's first gradient does not).

The free functions of the method's update live in :mod:`guided_descent.preconditioners`; the
method's module is its ``torch.optim`` shell, its registry entry, and the refresh bookkeeping
that differs between methods (inverse roots, eigenbases).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from guided_descent.distributed.dtensor import local, shard_layout
from guided_descent.distributed.plan import assign
from guided_descent.distributed.split import TensorSpec, WorkSplit
from guided_descent.optimizers.diagnostics import rms
from guided_descent.optimizers.hybrid import HybridOptimizer
from guided_descent.preconditioners.kronecker import compute_dtype
from guided_descent.transforms.descend import descend_
from guided_descent.transforms.state_dtype import parse_state_dtype

Consume = Callable[[int, Tensor], None]


class KroneckerOptimizer(HybridOptimizer):
    """Base class: the matrix step of a Kronecker method, plain and FSDP2-sharded.

    Subclasses set :attr:`ALGORITHM` and :attr:`STATE_NAME` and implement :meth:`updates` and
    :meth:`cost` (and :meth:`init_matrix_state`, :meth:`matrix_state` for state-dict checks).
    """

    MIN_NDIM = 0  # vectors and scalars in a tagged group take the method's diagonal path
    MASKED_SKIP: ClassVar[bool] = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "state_dtype" in param_group:  # stored as a dtype, whatever name was passed
            owner = f"{self.ALGORITHM} (param group {len(self.param_groups)})"
            dtype = parse_state_dtype(owner, param_group["state_dtype"])
            param_group = {**param_group, "state_dtype": dtype}
        super().add_param_group(param_group)

    def updates(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, Tensor]],
        split: WorkSplit | None,
        consume: Consume,
        ok: Tensor | None = None,
    ) -> None:
        """Advance the state of every ``(parameter, full gradient)`` of ``items`` and hand the
        update ``U`` of each parameter that moves this step to ``consume(index, U)`` (the step is
        ``W (1 - lr wd) - lr U``). ``split`` shares the refresh work between ranks (``None``: this
        rank does all of it); with ``ok`` (a 0-d bool tensor) every state tensor changes only
        where it is true."""
        raise NotImplementedError

    def cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """Estimated FLOPs per step of ``p``'s update (balances owners between ranks)."""
        raise NotImplementedError

    def refresh_costs(self, p: Tensor, group: Mapping[str, Any]) -> list[float]:
        """Estimated FLOPs of one refresh of each of ``p``'s refresh units (Shampoo: one per
        block; SOAP: one per parameter); ``[]`` when nothing of ``p`` is refreshed."""
        raise NotImplementedError

    def refresh_slot(self, p: Tensor, group: Mapping[str, Any], unit: int = 0) -> int:
        """The offset in ``[0, precondition_frequency)`` of the refreshes of ``p``'s refresh unit
        ``unit``: a unit refreshes on the steps ``t`` past the first refresh with ``t - first ≡
        slot (mod precondition_frequency)``.

        With ``stagger_refresh`` the units of the group are spread over the offsets by greedy
        longest-processing-time balancing of :meth:`refresh_costs` (the one that shares work
        between ranks), so no step pays for every refresh; it depends only on the group's shapes
        and settings, hence is the same on every rank and after a resume. Off: 0 for all units,
        the references' schedule."""
        if not group.get("stagger_refresh", False) or int(group["precondition_frequency"]) <= 1:
            return 0
        if torch.compiler.is_compiling():  # _init_group has placed them, eagerly
            return self._slots[p][unit]
        self._place_slots(group)
        slots = self._slots.get(p, [])
        if unit >= len(slots):  # the group's layout changed under the same key: place anew
            self._place_slots(group, force=True)
            slots = self._slots.get(p, [])
        return slots[unit] if unit < len(slots) else 0

    def _place_slots(self, group: Mapping[str, Any], force: bool = False) -> None:
        """Assign the refresh offsets of ``group``'s units (once per group layout; host work)."""
        freq = int(group["precondition_frequency"])
        params = group["params"]
        layout = tuple(
            repr(group.get(k)) for k in ("matrix_view", "max_precond_dim", "max_preconditioner_dim")
        )
        key = (freq, layout, tuple(id(q) for q in params))
        if not force and self._slot_keys.get(id(group)) == key:
            return
        units = [(q, c) for q in params for c in self.refresh_costs(q, group)]
        owners = assign([c for _q, c in units], freq).owners if units else ()
        for q in params:
            self._slots[q] = []
        for (q, _c), slot in zip(units, owners, strict=True):
            self._slots[q].append(slot)
        self._slot_keys[id(group)] = key

    def _init_group(self, group: dict[str, Any]) -> None:
        # Run eagerly under torch.compile (see HybridOptimizer._init_group): the offsets too.
        super()._init_group(group)
        if group["algorithm"] == self.ALGORITHM and group.get("stagger_refresh", False):
            self._place_slots(group)

    @property
    def _slots(self) -> dict[Tensor, list[int]]:
        # Keyed by the parameter itself (as ``state`` is), so a compiled step can look it up.
        # Created on first use: subclasses' constructors need not know about it.
        if "_refresh_slots" not in self.__dict__:
            self.__dict__["_refresh_slots"] = {}
            self.__dict__["_refresh_slot_keys"] = {}
        return self.__dict__["_refresh_slots"]

    @property
    def _slot_keys(self) -> dict[int, tuple[Any, ...]]:
        self._slots  # noqa: B018  # creates both
        return self.__dict__["_refresh_slot_keys"]

    def matrix_step(self, group: dict[str, Any], ok: Tensor | None = None) -> None:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{self.STATE_NAME} does not support sparse gradients")
            params.append(p)
        plain = [p for p in params if shard_layout(p) is None]
        sharded = [p for p in params if shard_layout(p) is not None]
        lr = float(group["lr"])
        if plain:

            def apply(i: int, update: Tensor) -> None:
                descend_(plain[i], update, lr, group["weight_decay"], ok)

            self.updates(group, [(p, p.grad) for p in plain], self.work_split, apply, ok)
        if sharded:
            self._sharded_step(group, sharded)

    def _sharded_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """FSDP2: the owner of each sharded parameter computes its update from the full gradient
        and sends every rank its shard (see the module docstring)."""
        split = self.sharded_split()
        # Owners over all sharded parameters of the group, not just those with a gradient this
        # step: the owner keeps the state, so it must not change from step to step.
        every = [p for p in group["params"] if shard_layout(p) is not None]
        plan = assign([self.cost(p, group) for p in every], split.world_size)
        owner_of = {id(p): rank for p, rank in zip(every, plan.owners, strict=True)}
        owners = [owner_of[id(p)] for p in params]
        for p, owner in zip(params, owners, strict=True):
            if owner != split.rank:
                # An empty entry: DCP's get/set_optimizer_state_dict then see every parameter.
                self.state[p]  # noqa: B018
        lr = float(group["lr"])
        dtypes = [compute_dtype(p.dtype) for p in params]

        def compute(indices: list[int], full: list[Tensor]) -> list[tuple[Tensor, list[Tensor]]]:
            found: dict[int, Tensor] = {}

            def keep(j: int, update: Tensor) -> None:
                # May be a state buffer itself (a momentum): nothing writes to it before it is
                # sent.
                found[j] = update

            self.updates(
                group, [(params[i], g) for i, g in zip(indices, full, strict=True)], None, keep
            )
            out = []
            for j, i in enumerate(indices):
                update = found.get(j)
                if update is None:  # it does not move this step: zeros, and a flag that says so
                    zero = torch.zeros(params[i].shape, dtype=dtypes[i], device=full[j].device)
                    out.append((zero, [zero.new_zeros(()), zero.new_zeros(())]))
                else:
                    moved = update.new_ones(())
                    out.append((update, [moved, rms(update, lr).to(update.dtype)]))
            return out

        shards, extras = split.map_sharded(
            self.ALGORITHM,
            owners,
            [self.cost(p, group) for p in params],
            [local(p.grad) for p in params],
            [shard_layout(p) for p in params],  # type: ignore[misc]  # sharded, not None
            compute,
            out_dtypes=dtypes,
            extra_specs=[
                [TensorSpec((), dt, p.device)] * 2 for dt, p in zip(dtypes, params, strict=True)
            ],
        )
        for p, owner, update, (moved, size) in zip(params, owners, shards, extras, strict=True):
            if owner != split.rank:
                self._observe(p, update_rms=size)
            if bool(moved):
                descend_(local(p), update, lr, group["weight_decay"])
