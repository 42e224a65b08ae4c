"""SOAP: Adam in the eigenbasis of Shampoo's factors; AdamW for routed-out parameters.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321. The
update rule lives in :mod:`guided_descent.preconditioners.soap` and the basis refresh in
:mod:`guided_descent.linalg.eigenbasis`; this module is the ``torch.optim`` shell and the
registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from guided_descent.distributed.dtensor import local, shard_layout
from guided_descent.distributed.plan import assign, eigh_flops, qr_refresh_flops
from guided_descent.distributed.split import Distributed, TensorSpec, WorkSplit, auto
from guided_descent.optimizers.diagnostics import rms
from guided_descent.optimizers.hybrid import (
    HybridOptimizer,
    adamw_defaults,
    build_groups,
    mark_refreshed,
    refresh_age,
    warn_failure,
)
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.kronecker import compute_dtype, factor_name, kronecker_factor
from guided_descent.preconditioners.soap import (
    BasisRefresh,
    initial_bases,
    permute_rotated_,
    refresh_bases,
    rotated_dims,
    soap_update,
)
from guided_descent.transforms.descend import descend_

PREFIX = "soap"
FAILURES = f"{PREFIX}.failures"
REFRESHED_AT = f"{PREFIX}.refreshed_at"

# (parameter, its state, dimension, factor key) of one basis to compute or refresh
_BasisJob = tuple[Tensor, dict[str, Any], int, str]


class SOAP(HybridOptimizer):
    """SOAP (Vyas et al. 2024, arXiv 2409.11321) with AdamW for groups tagged ``"adamw"``.

    Update of a parameter ``W`` of a ``"soap"`` group, gradient ``G``, bases ``Q_i`` of the
    dimensions of length ``2 .. max_precond_dim`` of a >= 2-D parameter (identity elsewhere), all
    in float32 (float64 for float64 parameters); ``t`` counts Adam updates::

        G' = G ×_i Q_iᵀ                         (matrix: Q_Lᵀ G Q_R)
        m  = beta1 m + (1 - beta1) G            (original space)
        v' = beta2 v' + (1 - beta2) G'²         (rotated space)
        N  = [(m ×_i Q_iᵀ) / (1 - beta1^t) / (sqrt(v' / (1 - beta2^t)) + eps)] ×_i Q_i
        W  = W (1 - lr weight_decay) - lr N
        F_i = shampoo_beta F_i + (1 - shampoo_beta) G_(i) G_(i)ᵀ
        if t % precondition_frequency == 0:  Q_i ← qr(F_i Q_i) (sorted power step), v' permuted

    The first gradient a parameter with bases receives only fills ``F_i`` and sets ``Q_i`` to
    their eigenvectors by a full ``eigh``; the parameter first moves on its second step, so that
    no gradient is ever projected on a basis built from itself (the paper's implementation does
    the same). Parameters without bases (vectors, scalars, all dimensions too long) are plain
    AdamW from their first step. Bias correction and ``eps`` sit as in ``torch.optim.AdamW``, and
    weight decay is applied before the step as there (the paper's code decays after it), so with
    identity bases SOAP equals ``torch.optim.AdamW``.

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``). Untagged
            groups stay on SOAP whatever their rank (``MIN_NDIM = 0``). Use :func:`soap` on a
            model to route embeddings, the head, norms and biases to AdamW.
        lr: learning rate. Default 3e-3 (the paper's).
        betas: Adam's ``(beta1, beta2)``. Default (0.95, 0.95).
        eps: Adam's denominator term. Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.01.
        shampoo_beta: EMA coefficient of the factors; ``None`` (default) uses ``beta2``.
        precondition_frequency: Adam steps between eigenbasis refreshes. Default 10.
        max_precond_dim: dimensions longer than this keep the identity basis. Default 10000;
            0 turns SOAP into AdamW.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: hyper-parameters of the AdamW groups;
            ``None`` (default) takes ``lr``, ``betas``, ``eps``, ``weight_decay``.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        distributed: split the eigendecompositions and basis refreshes between data-parallel
            replicas (each by one rank, balanced by FLOPs, then all-gathered). ``None``
            (default): only when :func:`soap` is given a DDP module; ``True``, a process group
            or a :class:`~guided_descent.distributed.WorkSplit`: always; ``False``: never. An
            FSDP2-sharded (DTensor) parameter is always handled by one owner rank, which keeps
            its whole state, receives the gradient shards and sends the update shards back.

    State per SOAP parameter (float32, or float64): ``step``; ``exp_avg`` (original space);
    ``exp_avg_sq`` (rotated space); per rotated dimension ``soap.L``/``soap.R`` (matrices) or
    ``soap.dim{i}``, the ``(n, n)`` factor, and ``soap.L.basis`` etc., its eigenbasis;
    ``soap.failures``: basis computations that failed (the previous basis, or the identity, is
    kept and one warning is issued per parameter); ``soap.refreshed_at``: the step of the last
    basis computation in which all of the parameter's bases succeeded (``diagnostics()``
    reports the age ``step - refreshed_at`` and a condition-number estimate of the factors from
    the refresh's Rayleigh quotients). Which dimensions are rotated is fixed when a parameter's
    state is created.
    """

    ALGORITHM = "soap"
    STATE_NAME = "SOAP"
    MIN_NDIM = 0

    def __init__(
        self,
        params: Any,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        shampoo_beta: float | None = None,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] | None = None,
        adamw_eps: float | None = None,
        adamw_weight_decay: float | None = None,
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            shampoo_beta=shampoo_beta,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )
        validate_hyperparams(PREFIX, defaults)
        adamw = adamw_defaults(
            adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, inherit=defaults
        )
        super().__init__(params, defaults, adamw, on_nonfinite, distributed)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        shape = tuple(p.shape)
        keys = ("step", "exp_avg", "exp_avg_sq", FAILURES)
        shapes: dict[str, tuple[int, ...]] = {"exp_avg": shape, "exp_avg_sq": shape}
        for d in rotated_dims(shape, group["max_precond_dim"]):
            key = f"{PREFIX}.{factor_name(d, p.dim())}"
            shapes[key] = shapes[f"{key}.basis"] = (shape[d], shape[d])
        return keys, shapes

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state.get(p)
        if not state:
            return {}
        rotated = bool(self._factor_keys(p, state))
        return {
            "preconditioner": "eigenbasis" if rotated else None,
            "preconditioner_age": refresh_age(state, REFRESHED_AT) if rotated else None,
            "condition_number": self.worst_condition(p),
            "failures": int(state.get(FAILURES, 0)),
        }

    @staticmethod
    def _init_state(state: dict[str, Any], p: Tensor, dims: tuple[int, ...]) -> None:
        dtype = compute_dtype(p.dtype)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state[FAILURES] = 0
        for d in dims:
            n = p.shape[d]
            key = f"{PREFIX}.{factor_name(d, p.dim())}"
            state[key] = torch.zeros(n, n, dtype=dtype, device=p.device)
            state[f"{key}.basis"] = torch.eye(n, dtype=dtype, device=p.device)

    @staticmethod
    def _factor_keys(p: Tensor, state: Mapping[str, Any]) -> list[tuple[int, str]]:
        keys = [(d, f"{PREFIX}.{factor_name(d, p.dim())}") for d in range(p.dim())]
        return [(d, key) for d, key in keys if key in state]

    def matrix_step(self, group: dict[str, Any]) -> None:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SOAP does not support sparse gradients")
            params.append(p)
        plain = [p for p in params if shard_layout(p) is None]
        sharded = [p for p in params if shard_layout(p) is not None]
        lr = float(group["lr"])
        if plain:

            def apply(i: int, update: Tensor) -> None:
                descend_(plain[i], update, lr, group["weight_decay"])

            self._updates(group, [(p, p.grad) for p in plain], self.work_split, apply)
        if sharded:
            self._sharded_step(group, sharded)

    def _updates(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, Tensor]],
        split: WorkSplit | None,
        consume: Callable[[int, Tensor], None],
    ) -> None:
        """Advance the state of every ``(parameter, full gradient)``; hand the update ``N`` of
        each parameter that moves this step (not on its first gradient, see the class
        docstring) to ``consume(index, N)``. ``split`` shares the work of the bases."""
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        fresh: list[_BasisJob] = []
        due: list[_BasisJob] = []
        lr = float(group["lr"])

        for i, (p, raw_grad) in enumerate(items):
            state = self.state[p]
            grad = raw_grad.to(compute_dtype(p.dtype))  # p.grad itself is never written
            is_new = not state
            if is_new:
                self._init_state(state, p, rotated_dims(p.shape, group["max_precond_dim"]))
            factors = self._factor_keys(p, state)
            if is_new and factors:
                # First gradient: statistics and the first basis only (see the class docstring).
                for d, key in factors:
                    state[key].lerp_(kronecker_factor(grad, d), 1.0 - shampoo_beta)
                    fresh.append((p, state, d, key))
                self._observe(p, update_rms=grad.new_zeros(()))  # it did not move
                continue

            state["step"] += 1
            t = int(state["step"].item())
            bases: list[Tensor | None] = [None] * p.dim()
            for d, key in factors:
                bases[d] = state[f"{key}.basis"]
            update = soap_update(
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                bases,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                step=t,
            )
            self._observe(p, update_rms=rms(update, lr))
            consume(i, update)
            # After the step, so that this gradient is not used to rotate itself.
            for d, key in factors:
                state[key].lerp_(kronecker_factor(grad, d), 1.0 - shampoo_beta)
                if t % group["precondition_frequency"] == 0:
                    due.append((p, state, d, key))

        self._initial_bases(fresh, split)
        self._refresh_bases(due, split)

    def _cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """Estimated FLOPs per step of a parameter's update: four mode products with each
        rotated dimension's basis and its factor statistics (``~2 numel n`` each), plus the
        basis refresh amortized over ``precondition_frequency``."""
        cost = float(p.numel())
        for d in rotated_dims(tuple(p.shape), group["max_precond_dim"]):
            n = p.shape[d]
            cost += 10.0 * p.numel() * n + qr_refresh_flops(n) / group["precondition_frequency"]
        return cost

    def _sharded_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """FSDP2: each sharded parameter's whole SOAP state lives on one owner rank (rotating
        into the eigenbasis needs the full matrix). Every rank sends its gradient shard to the
        owner, which computes the update exactly as on one process and sends the shards back,
        with a flag saying whether the parameter moves this step."""
        split = self.sharded_split()
        # Owners over all sharded parameters of the group, not just those with a gradient this
        # step: the owner keeps the state, so it must not change from step to step.
        every = [p for p in group["params"] if shard_layout(p) is not None]
        plan = assign([self._cost(p, group) for p in every], split.world_size)
        owner_of = {id(p): rank for p, rank in zip(every, plan.owners, strict=True)}
        owners = [owner_of[id(p)] for p in params]
        for p, owner in zip(params, owners, strict=True):
            if owner != split.rank:
                # An empty entry: DCP's get/set_optimizer_state_dict then see every parameter.
                self.state[p]  # noqa: B018
        lr = float(group["lr"])
        dtypes = [compute_dtype(p.dtype) for p in params]

        def compute(indices: list[int], full: list[Tensor]) -> list[tuple[Tensor, list[Tensor]]]:
            updates: dict[int, Tensor] = {}

            def keep(i: int, update: Tensor) -> None:
                updates[i] = update

            self._updates(
                group, [(params[i], g) for i, g in zip(indices, full, strict=True)], None, keep
            )
            out = []
            for j, i in enumerate(indices):
                update = updates.get(j)
                if update is None:  # the first gradient: zeros, and a flag that says "stay"
                    zero = torch.zeros(params[i].shape, dtype=dtypes[i], device=full[j].device)
                    out.append((zero, [zero.new_zeros(()), zero.new_zeros(())]))
                else:
                    moved = update.new_ones(())
                    out.append((update, [moved, rms(update, lr).to(update.dtype)]))
            return out

        shards, extras = split.map_sharded(
            "soap",
            owners,
            [self._cost(p, group) for p in params],
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

    def _initial_bases(self, jobs: list[_BasisJob], split: WorkSplit | None) -> None:
        if not jobs:
            return
        factors = [state[key] for _p, state, _d, key in jobs]
        if split is None:
            bases = initial_bases(factors)
        else:
            bases = self._split_initial_bases(factors, split)
        failed: set[int] = set()
        for (p, state, _d, key), basis in zip(jobs, bases, strict=True):
            if basis is None:  # keeps the identity basis it was created with
                failed.add(id(p))
                what = f"the eigendecomposition of {key}"
                warn_failure(PREFIX, state, FAILURES, tuple(p.shape), what)
                continue
            state[f"{key}.basis"] = basis
        mark_refreshed(((p, state) for p, state, _d, _key in jobs), failed, REFRESHED_AT)

    @staticmethod
    def _split_initial_bases(factors: list[Tensor], split: WorkSplit) -> list[Tensor | None]:
        """Each rank decomposes its share; bases and success flags reach every rank."""
        specs = [[TensorSpec.of(F), TensorSpec((), torch.bool, F.device)] for F in factors]

        def compute(indices: list[int]) -> list[list[Tensor]]:
            out = []
            for i, basis in zip(indices, initial_bases([factors[i] for i in indices]), strict=True):
                F = factors[i]
                if basis is None:
                    out.append([torch.zeros_like(F), F.new_zeros((), dtype=torch.bool)])
                else:
                    out.append([basis, F.new_ones((), dtype=torch.bool)])
            return out

        costs = [eigh_flops(F.shape[0]) for F in factors]
        shared = split.map("eigh", costs, specs, compute)
        return [basis if bool(ok) else None for basis, ok in shared]

    def _refresh_bases(self, jobs: list[_BasisJob], split: WorkSplit | None) -> None:
        if not jobs:
            return
        factors = [state[key] for _p, state, _d, key in jobs]
        bases = [state[f"{key}.basis"] for _p, state, _d, key in jobs]
        if split is None:
            results = refresh_bases(factors, bases)
        else:
            results = self._split_refresh_bases(factors, bases, split)
        failed: set[int] = set()
        for (p, state, d, key), result in zip(jobs, results, strict=True):
            if not bool(result.ok):
                failed.add(id(p))
                what = f"the eigenbasis refresh of {key}"
                warn_failure(PREFIX, state, FAILURES, tuple(p.shape), what)
                continue
            state[f"{key}.basis"] = result.basis
            permute_rotated_(state["exp_avg_sq"], d, result.order)
            self.observe_condition(p, key, result.condition)
        mark_refreshed(((p, state) for p, state, _d, _key in jobs), failed, REFRESHED_AT)

    @staticmethod
    def _split_refresh_bases(
        factors: list[Tensor], bases: list[Tensor], split: WorkSplit
    ) -> list[BasisRefresh]:
        """Each rank refreshes its share; every field of every refresh reaches every rank."""
        specs = []
        for F in factors:
            n = F.shape[0]
            specs.append(
                [
                    TensorSpec.of(F),  # basis (in the compute dtype, like the factor)
                    TensorSpec((n,), torch.int64, F.device),  # column order
                    TensorSpec((), torch.bool, F.device),  # ok
                    TensorSpec((), F.dtype, F.device),  # condition estimate
                ]
            )

        def compute(indices: list[int]) -> list[list[Tensor]]:
            results = refresh_bases([factors[i] for i in indices], [bases[i] for i in indices])
            return [
                [r.basis, r.order, r.ok, r.condition.to(factors[i].dtype)]
                for i, r in zip(indices, results, strict=True)
            ]

        costs = [qr_refresh_flops(F.shape[0]) for F in factors]
        shared = split.map("qr_refresh", costs, specs, compute)
        return [BasisRefresh(*fields) for fields in shared]


def soap(
    target: nn.Module | Iterable[Any],
    *,
    lr: float = 3e-3,
    betas: tuple[float, float] = (0.95, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    shampoo_beta: float | None = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] | None = None,
    adamw_eps: float | None = None,
    adamw_weight_decay: float | None = None,
    routing: Mapping[str, str] | None = None,
    on_nonfinite: str = "skip",
    distributed: Distributed = None,
) -> SOAP:
    """A :class:`SOAP` for a model (routed: :func:`guided_descent.routing.route`) or parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights go to SOAP and embeddings, the
    output head, norms and biases to AdamW; ``routing`` maps ``fnmatch`` patterns on parameter
    names to ``"soap"`` or ``"adamw"`` to override that. Given a list of parameters, all go to
    SOAP (vectors and scalars are plain AdamW inside it); param-group dicts are passed through.
    The other arguments are :class:`SOAP`'s.
    """
    groups = build_groups(target, SOAP.ALGORITHM, routing, min_ndim=SOAP.MIN_NDIM)
    return SOAP(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        shampoo_beta=shampoo_beta,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        adamw_lr=adamw_lr,
        adamw_betas=adamw_betas,
        adamw_eps=adamw_eps,
        adamw_weight_decay=adamw_weight_decay,
        on_nonfinite=on_nonfinite,
        distributed=auto(distributed, target),
    )


SPEC = register(
    OptimizerSpec(
        name="soap",
        family="layer-wise",
        rule="Adam on Q_Lᵀ G Q_R (Q: eigenbases of Shampoo's L, R, power-iteration refresh), "
        "rotated back",
        state="2x (first moment, rotated second moment) + per dimension an n×n factor and basis",
        state_buffers=2.0,
        reference="Vyas et al. 2024, arXiv 2409.11321",
        factory=soap,
        defaults=dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
        routes=True,
    )
)
