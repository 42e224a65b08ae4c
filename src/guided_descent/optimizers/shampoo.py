"""Shampoo with Adam grafting, blocking and a diagonal fallback; AdamW for routed-out parameters.

Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization",
arXiv 1802.09568; Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning",
arXiv 2002.09018 (grafting, blocking, delayed preconditioning). The preconditioner's math lives in
:mod:`guided_descent.preconditioners.shampoo`; this module is the ``torch.optim`` shell and the
registry entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from guided_descent.distributed.plan import diagonal_root_flops, inverse_root_flops
from guided_descent.distributed.split import Distributed, TensorSpec, WorkSplit
from guided_descent.optimizers.compiled import check_compile_update, kernel
from guided_descent.optimizers.diagnostics import rms
from guided_descent.optimizers.hybrid import (
    adamw_defaults,
    counter,
    mark_refreshed,
    mark_refreshed_on_device,
    refresh_age,
    routed_factory,
    warn_failure,
)
from guided_descent.optimizers.kronecker import KroneckerOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.kronecker import compute_dtype, factor_name
from guided_descent.preconditioners.refresh import flagged_inverse_roots
from guided_descent.preconditioners.shampoo import (
    FULL,
    InverseRoot,
    ShampooLayout,
    accumulate_factors_,
    block_direction,
    identity_roots,
    inverse_roots,
    new_factors,
    shampoo_layout,
)
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.cautious import with_group_keys
from guided_descent.transforms.grafting import (
    Grafting,
    accumulate_squares_,
    diagonal_update,
)
from guided_descent.transforms.masking import bias_correction, commit_, count_
from guided_descent.transforms.state_dtype import STATE_DTYPE_DEFAULT, parse_state_dtype
from guided_descent.transforms.state_dtype import compute_dtype as widest

PREFIX = "shampoo"
EXP_AVG = f"{PREFIX}.exp_avg"
GRAFT_SQ = f"{PREFIX}.graft_sq"
MOMENTUM_BUFFER = f"{PREFIX}.momentum_buffer"
RELATIVE_EPSILON = 1e-6  # chosen by measurement: see the class docstring
FAILURES = f"{PREFIX}.failures"
REFRESHED_AT = f"{PREFIX}.refreshed_at"

# (parameter, its state, factor key, block index, the factor, its root 2k) of a due root
_RootJob = tuple[Tensor, dict[str, Any], str, int, Tensor, int]


# --- Shampoo ------------------------------------------------------------------------------------


def _start(group: Mapping[str, Any]) -> int:
    """The first step that uses the Shampoo direction (``None``: the first refresh)."""
    start = group["start_preconditioning_step"]
    return group["precondition_frequency"] if start is None else start


def _damping(group: Mapping[str, Any]) -> tuple[float, float]:
    """``(epsilon, relative_epsilon)`` of a group: the factors' damping."""
    return group["epsilon"], group.get("relative_epsilon", 0.0)


def _check_shampoo_options(owner: str, group: Mapping[str, Any]) -> None:
    """Checks across Shampoo's keys (each key alone is checked by ``validation.CHECKS``)."""
    if group.get("nesterov") and group.get("momentum", 0.0) == 0.0:
        raise ValueError(f"{owner}: nesterov=True needs momentum > 0, got momentum=0")


def _stored(group: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype a group stores its parameter-sized buffers in (``None``: the factors')."""
    return parse_state_dtype(PREFIX, group.get("state_dtype"))


def _first_moment_(exp_avg: Tensor, grad: Tensor, beta1: float, ok: Tensor | None) -> Tensor:
    """``m = beta1 m + (1 - beta1) g`` into ``exp_avg`` (only where ``ok``); the new ``m``.

    A buffer stored apart (``state_dtype``: bf16 beside a float32 ``grad``) is read widened,
    advanced by the in-place path's kernel and rounded into the buffer once; the step uses the
    unrounded (..) float32 value."""
    if ok is None and exp_avg.dtype == grad.dtype:
        return exp_avg.lerp_(grad, 1.0 - beta1)
    m = exp_avg.to(widest(exp_avg, grad)).lerp(grad, 1.0 - beta1)  # exp_avg itself if same dtype
    commit_(exp_avg, m, ok)
    return m


def _momentum(
    state: dict[str, Any], update: Tensor, group: Mapping[str, Any], ok: Tensor | None = None
) -> Tensor:
    """Heavy-ball (or Nesterov) momentum on the grafted update, its buffer as the first
    moment's: stored in the group's ``state_dtype``, read widened and rounded into once."""
    momentum = group["momentum"]
    if momentum == 0.0:
        return update
    if MOMENTUM_BUFFER not in state:
        state[MOMENTUM_BUFFER] = torch.zeros_like(update, dtype=_stored(group) or update.dtype)
    buf = state[MOMENTUM_BUFFER]
    if ok is None and buf.dtype == update.dtype:
        new = buf.mul_(momentum).add_(update)
    else:  # out of place, kept where ok; (..) float32 from bf16 state, rounded once on store
        new = buf.to(widest(buf, update)).mul(momentum).add_(update)
        commit_(buf, new, ok)
    return update.add(new, alpha=momentum) if group["nesterov"] else new


class Shampoo(KroneckerOptimizer):
    """Shampoo (Gupta et al. 2018; Anil et al. 2020) with AdamW for groups tagged ``"adamw"``.

    Update of a parameter ``W`` of a ``"shampoo"`` group at step ``t``, gradient ``G``, everything
    computed in float32 (float64 for float64 parameters)::

        m = beta1 m + (1 - beta1) G;   M = m / (1 - beta1^t)          first moment
        s = beta2 s + (1 - beta2) G²   (AdaGrad: s = s + G²)           diagonal accumulator
        A = M / (sqrt(s / (1 - beta2^t)) + eps)                         the graft's (Adam's) step
        per block B (of size <= max_preconditioner_dim per dimension), order k:
            F_i = beta2 F_i + (1 - beta2) G_(i) G_(i)ᵀ                   per dimension i
            if t >= start and (t - start) % precondition_frequency == 0:
                P_i = (F_i / (1 - beta2^t) + ε_i I)^(-1/(2k))
                      ε_i = epsilon + relative_epsilon · λ_max(F_i / (1 - beta2^t))
            D_B = M_B ×_0 P_0 ... ×_{k-1} P_{k-1}                        (matrix: P_L M_B P_R)
            U_B = D_B * ||A_B|| / ||D_B||                               Adam grafting
        U = A where t < start, or for blocks without a Kronecker preconditioner (vectors,
            scalars: the diagonal fallback; see :mod:`guided_descent.preconditioners.shampoo`)
        b = momentum b + U;  U = U + momentum b (nesterov) or b          (if momentum > 0)
        W = W (1 - lr weight_decay) - lr U

    **Well-posed early steps** (the defaults ``relative_epsilon=1e-6`` and starting at the first
    refresh). A factor built from a few gradients is rank-deficient; with only the references'
    absolute ``epsilon = 1e-12``, its null-space directions are amplified by ``ε^(-1/2k)`` and,
    once grafted to Adam's norm, rounding decided the direction: a relative gradient noise of
    1e-7, or the same batch as two accumulated halves, changed the displacement after 10 steps by
    60 % (a 20-64-64-5 tanh MLP; AdamW: 5e-7). Measured alternatives (displacement change after
    10 / 30 steps; final metric, 3 seeds, on every CPU ``bench train`` workload):

    =================================  ===============  ========================================
    damping, start                     change 10 / 30   quality vs the references' setting
    =================================  ===============  ========================================
    1e-12 absolute, step 1 (refs.)     6e-1 / 4e-1      --
    + relative 1e-5                    4e-4 / 3e-4      kron-quadratic 12 % worse, others level
    + relative 1e-4                    7e-5 / 4e-5      kron-quadratic 29 % worse, autoenc. 5 %
    + relative 1e-6, start at refresh  2e-5 / 1e-4      level on all eight (within seed range)
    =================================  ===============  ========================================

    The last is the default: on a CNN too the change stays at 5e-7, and results no longer depend
    on the machine, the batch split or DDP.

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``). Untagged
            groups are split by shape like every matrix method's: >= 2-D to Shampoo, the rest to
            AdamW; a group tagged ``"shampoo"`` may hold vectors and scalars too (its diagonal
            path). Use :func:`shampoo` on a model to route embeddings, the head, norms and biases.
        lr: learning rate. With Adam grafting the step has Adam's size, so Adam's learning rates
            apply. Default 1e-3.
        betas: ``(beta1, beta2)``: the first moment's EMA; the EMA of the factors and of the Adam
            graft's squared gradients. Default (0.9, 0.999).
        eps: the graft's denominator term (Adam's ``eps``). Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.
        epsilon: absolute damping added to the factors' eigenvalues before the inverse root.
            Default 1e-12 (the references').
        relative_epsilon: damping relative to each factor's largest eigenvalue, added to
            ``epsilon``. Default 1e-6 (see "Well-posed early steps").
        momentum: heavy-ball momentum on the grafted update, in [0, 1). Default 0 (the first
            moment already averages).
        nesterov: Nesterov's look-ahead form of that momentum. Default False.
        precondition_frequency: steps between inverse-root refreshes. Default 10.
        stagger_refresh: spread the blocks' inverse-root refreshes over the
            ``precondition_frequency`` steps between refreshes, balanced by cost (every block
            still refreshes once per period; all of them at the first refresh), so that no step
            pays for all roots at once. Default True; False: every root on the same step, as the
            references do.
        start_preconditioning_step: first step that uses the Shampoo direction; earlier steps
            take the graft's update (the factors accumulate from step 1). Default ``None``: the
            first refresh, ``precondition_frequency`` (Distributed Shampoo's default).
        max_preconditioner_dim: dimensions longer than this are cut into blocks. Default 1024.
        max_factor_dim: dimensions longer than this get a diagonal factor instead. Default 4096.
        matrix_view: how a parameter is cut into matrices before blocking
            (:mod:`guided_descent.preconditioners.views`): ``"flatten"`` (default) preconditions
            it as the tensor it is; ``"split:K"`` and ``"batch"`` give each of its matrices its own
            factors (routing sets these per group for attention, recurrent and expert weights).
        grafting: ``"adam"`` (default), ``"adagrad"`` or ``"none"`` (the raw Shampoo direction;
            vectors and early steps still take Adam's update).
        compile_update: run each block's preconditioned, grafted direction
            (:func:`~guided_descent.preconditioners.shampoo.block_direction`) through
            ``torch.compile(fullgraph=True)``; statistics and inverse roots stay eager
            (:mod:`guided_descent.optimizers.compiled`). Default False (eager; measured in
            docs/benchmarks.md).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: hyper-parameters of the AdamW groups;
            ``None`` (default) takes ``lr``, ``betas``, ``eps``, ``weight_decay``.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        state_dtype: the dtype the parameter-sized buffers (``shampoo.exp_avg``,
            ``shampoo.graft_sq`` and ``shampoo.momentum_buffer``) are stored in: ``None``
            (default) float32 (float64 for float64 parameters), as the rest of the state, even for
            a bfloat16 model; ``torch.bfloat16`` halves them (``torch.float32`` or the names
            ``"bfloat16"``/``"float32"`` are accepted too). A step reads them widened to float32,
            computes what the float32 path computes and rounds into them once
            (:mod:`guided_descent.transforms.state_dtype`); the step itself uses the unrounded
            values. The Kronecker factors and their inverse roots stay float32 (a factor summed in
            bf16 loses the small eigenvalues the root amplifies). The AdamW groups keep torch's
            AdamW state, in the parameter's dtype.
        distributed: split the inverse roots of a refresh between data-parallel replicas (each
            root computed by one rank, balanced by FLOPs, then all-gathered), so that every
            replica keeps the same state. ``None`` (default): only when :func:`shampoo` is given
            a DDP module; ``True``, a process group or a
            :class:`~guided_descent.distributed.WorkSplit`: always; ``False``: never. An
            FSDP2-sharded (DTensor) parameter is always handled by one owner rank, which keeps
            its whole state, receives the gradient shards and sends the update shards back.

    State per Shampoo parameter (float32, or float64): ``step``; ``shampoo.exp_avg`` (``m``);
    ``shampoo.graft_sq`` (``s``); ``shampoo.momentum_buffer`` (when momentum > 0) -- these three
    in ``state_dtype`` when it is given; per dimension
    ``shampoo.L``/``shampoo.R`` (matrices) or ``shampoo.dim{i}``: a list with one factor per
    block (``(n, n)``, ``(n,)`` for a diagonal factor, ``None`` for none) and
    ``shampoo.L.inv_root`` etc. the matching roots; ``shampoo.failures``: inverse roots that failed
    (a failed root -- eigh not converging even in float64 with jitter, NaN/Inf in a factor --
    keeps its previous root, identity before the first; one warning per parameter);
    ``shampoo.refreshed_at``: the step of the last refresh in which all of the parameter's roots
    succeeded (``diagnostics()`` reports the age ``step - refreshed_at``).
    """

    ALGORITHM = "shampoo"
    # What this method takes from a model (guided_descent.routing): hidden matrices only.
    ROUTING = RoutingPolicy(head=True)
    STATE_NAME = "Shampoo"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        epsilon: float = 1e-12,
        relative_epsilon: float = RELATIVE_EPSILON,
        momentum: float = 0.0,
        nesterov: bool = False,
        precondition_frequency: int = 10,
        stagger_refresh: bool = True,
        start_preconditioning_step: int | None = None,
        max_preconditioner_dim: int = 1024,
        max_factor_dim: int = 4096,
        matrix_view: str = "flatten",
        grafting: Grafting = "adam",
        compile_update: bool = False,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] | None = None,
        adamw_eps: float | None = None,
        adamw_weight_decay: float | None = None,
        on_nonfinite: str = "skip",
        state_dtype: torch.dtype | str | None = None,
        distributed: Distributed = None,
        router: Router | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            epsilon=epsilon,
            relative_epsilon=relative_epsilon,
            momentum=momentum,
            nesterov=nesterov,
            precondition_frequency=precondition_frequency,
            stagger_refresh=stagger_refresh,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            max_factor_dim=max_factor_dim,
            matrix_view=matrix_view,
            grafting=grafting,
        )
        validate_hyperparams(PREFIX, defaults)
        _check_shampoo_options(PREFIX, defaults)
        self.compile_update = check_compile_update(PREFIX, compile_update)
        adamw = adamw_defaults(
            adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, inherit=defaults
        )
        # After adamw_defaults: AdamW groups keep torch's state and take no state_dtype.
        defaults["state_dtype"] = parse_state_dtype(PREFIX, state_dtype)
        super().__init__(params, defaults, adamw, on_nonfinite, distributed, router)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's load (state in the dtype it was saved in: bf16 buffers stay bf16); a group
        saved before ``state_dtype`` existed loads with ``None``."""
        super().load_state_dict(with_group_keys(state_dict, STATE_DTYPE_DEFAULT, self.ALGORITHM))

    def check_group(self, owner: str, group: Mapping[str, Any]) -> None:
        _check_shampoo_options(owner, group)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        keys = ("step", EXP_AVG, GRAFT_SQ, FAILURES)
        if self._layout(p, group).preconditioned:
            keys += tuple(self._factor_keys(p))
        shape = tuple(p.shape)
        shapes = dict.fromkeys((EXP_AVG, GRAFT_SQ, MOMENTUM_BUFFER), shape)
        return keys, shapes

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state.get(p)
        if not state:
            return {}
        preconditioned = self._layout(p, group).preconditioned
        return {
            "preconditioner": "kronecker" if preconditioned else None,
            "preconditioner_age": refresh_age(state, REFRESHED_AT) if preconditioned else None,
            "condition_number": self.worst_condition(p),
            "failures": int(state.get(FAILURES, 0)),
        }

    def _layout(self, p: Tensor, group: Mapping[str, Any]) -> ShampooLayout:
        return shampoo_layout(
            tuple(p.shape),
            group["max_preconditioner_dim"],
            group["max_factor_dim"],
            group.get("matrix_view", "flatten"),
        )

    def _init_state(
        self, state: dict[str, Any], p: Tensor, layout: ShampooLayout, group: Mapping[str, Any]
    ) -> None:
        dtype = compute_dtype(p.dtype)
        stored = _stored(group) or dtype  # None: the factors' dtype, as before the option
        # On the parameter's device, so that a sync-free step updates it there (a CPU tensor
        # for CPU parameters, as before).
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
        state[EXP_AVG] = torch.zeros(p.shape, dtype=stored, device=p.device)
        state[GRAFT_SQ] = torch.zeros(p.shape, dtype=stored, device=p.device)
        state[FAILURES] = torch.zeros((), dtype=torch.int64, device=p.device)
        state["calls"] = 0  # steps attempted, counted on the host (the refresh schedule)
        if not layout.preconditioned:
            return
        per_block = [
            new_factors(b, dtype, p.device) if b.preconditioned else [None] * p.dim()
            for b in layout.blocks
        ]
        for dim in range(p.dim()):
            name = f"{PREFIX}.{factor_name(dim, p.dim())}"
            factors = [block_factors[dim] for block_factors in per_block]
            state[name] = factors
            state[f"{name}.inv_root"] = identity_roots(factors)

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        self._init_state(self.state[p], p, self._layout(p, group), group)

    def _factor_keys(self, p: Tensor) -> list[str]:
        return [f"{PREFIX}.{factor_name(dim, p.dim())}" for dim in range(p.dim())]

    def updates(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, Tensor]],
        split: WorkSplit | None,
        consume: Callable[[int, Tensor], None],
        ok: Tensor | None = None,
    ) -> None:
        """Advance the state of every ``(parameter, full gradient)`` and hand its update ``U``
        (the step is ``W (1 - lr wd) - lr U``) to ``consume(index, U)`` as soon as it is known;
        ``split`` shares the work of the due inverse roots. The moments advance after the
        roots (they do not depend on each other), one parameter at a time, so that the widened
        copies of ``state_dtype`` buffers live for one parameter's update only.

        A sync-free step (:attr:`_sync_free_step`) reads no counter on the host: the refresh
        schedule follows ``state["calls"]`` (host int: steps attempted) and bias corrections the
        ``step`` tensor; with ``ok`` every state tensor changes only where ``ok`` is true."""
        sync_free = self._sync_free_step
        beta1, beta2 = group["betas"]
        grafting = group["grafting"]
        start = _start(group)
        work: list[tuple[Tensor, Tensor, dict[str, Any], ShampooLayout, int]] = []
        # Every factor whose root is due this step, over the whole group, for one batched pass.
        due: list[_RootJob] = []

        for p, raw_grad in items:
            state = self.state[p]
            layout = self._layout(p, group)
            if not state:
                self._init_state(state, p, layout, group)
            count_(state["step"], ok)
            state["calls"] += 1
            # The schedule's step: the host's count when the step is sync-free, else the exact one.
            t = state["calls"] if sync_free else int(state["step"].item())
            grad = raw_grad.to(compute_dtype(p.dtype))  # p.grad itself is never written
            if layout.preconditioned:
                keys = self._factor_keys(p)
                if len(state[keys[0]]) != len(layout.blocks):
                    raise ValueError(
                        f"{PREFIX}: the parameter of shape {tuple(p.shape)} has state for "
                        f"{len(state[keys[0]])} blocks but the group's max_preconditioner_dim/"
                        f"max_factor_dim/matrix_view give {len(layout.blocks)}; they cannot change "
                        "mid-run"
                    )
                freq = group["precondition_frequency"]
                for b, block in enumerate(layout.blocks):
                    if not block.preconditioned:
                        continue
                    factors = [state[key][b] for key in keys]
                    accumulate_factors_(factors, grad[block.index], beta2, ok)
                    # Every block at the first refresh, then each on its own offset.
                    if t == start or (
                        t > start and (t - start) % freq == self.refresh_slot(p, group, b)
                    ):
                        for key, F in zip(keys, factors, strict=True):
                            if F is not None:
                                due.append((p, state, key, b, F, block.root))
            work.append((p, raw_grad, state, layout, t))

        if sync_free:
            self._refresh_roots_flagged(due, beta2, _damping(group), ok)
        else:
            self._refresh_roots(due, beta2, _damping(group), split)

        lr = float(group["lr"])
        for i, (p, raw_grad, state, layout, t) in enumerate(work):
            # Cast again rather than kept from the first loop: one parameter's copy at a time.
            grad = raw_grad.to(compute_dtype(p.dtype))
            m = _first_moment_(state[EXP_AVG], grad, beta1, ok)
            s = accumulate_squares_(state[GRAFT_SQ], grad, grafting, beta2, ok)
            # Bias corrections from the step actually taken: a tensor when it is not on the host.
            taken = state["step"] if sync_free else t
            exp_avg_hat = m / bias_correction(beta1, taken)
            diagonal = diagonal_update(
                exp_avg_hat,
                s,
                grafting,
                beta2=beta2,
                step=taken,
                eps=group["eps"],
            )
            if t < start or not layout.preconditioned:
                update = diagonal
            else:
                update = self._shampoo_direction(p, state, layout, exp_avg_hat, diagonal, grafting)
            update = _momentum(state, update, group, ok)
            self._observe(p, update_rms=rms(update, lr))
            consume(i, update)

    def restore_counts(self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        state["calls"] = int(state["step"].item())

    def cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """Estimated FLOPs per step of a parameter's whole update: factor statistics and the
        preconditioned direction (``~4 numel`` per dense dimension's length) and its inverse
        roots, amortized over ``precondition_frequency``."""
        numel = p.numel()
        cost = float(numel)
        for block in self._layout(p, group).blocks:
            if not block.preconditioned:
                continue
            block_numel = math.prod(block.shape)
            for n, kind in zip(block.shape, block.kinds, strict=True):
                if kind == FULL:
                    cost += 4.0 * block_numel * n
                    cost += inverse_root_flops(n) / group["precondition_frequency"]
        return cost

    def refresh_costs(self, p: Tensor, group: Mapping[str, Any]) -> list[float]:
        """One refresh unit per block: the inverse roots of its dense factors."""
        return [
            sum(
                inverse_root_flops(n)
                for n, kind in zip(block.shape, block.kinds, strict=True)
                if kind == FULL
            )
            for block in self._layout(p, group).blocks
        ]

    def _refresh_roots(
        self,
        due: list[_RootJob],
        beta2: float,
        damping: tuple[float, float],
        split: WorkSplit | None,
    ) -> None:
        if not due:
            return

        def scaled(job: _RootJob) -> Tensor:
            # The EMA starts from zero: dividing by 1 - beta2^t removes that bias, so that
            # epsilon damps a factor of the same scale at every step.
            _p, state, _key, _b, F, _root = job
            return F / (1.0 - beta2 ** int(state["step"].item()))

        def compute(indices: list[int]) -> list[InverseRoot | None]:
            jobs = [due[i] for i in indices]
            return inverse_roots(
                [scaled(job) for job in jobs], [job[-1] for job in jobs], *damping
            )

        if split is None:
            results = compute(list(range(len(due))))
        else:
            results = self._split_roots(due, compute, split)
        failed: set[int] = set()
        for (p, state, key, b, _F, _root), result in zip(due, results, strict=True):
            if result is None:
                failed.add(id(p))
                what = f"the inverse root of {key}"
                warn_failure(PREFIX, state, FAILURES, tuple(p.shape), what)
                continue
            state[f"{key}.inv_root"][b] = result.root
            self.observe_condition(p, (key, b), result.condition)
        mark_refreshed(((p, state) for p, state, *_ in due), failed, REFRESHED_AT)

    def _refresh_roots_flagged(
        self, due: list[_RootJob], beta2: float, damping: tuple[float, float], ok: Tensor | None
    ) -> None:
        """:meth:`_refresh_roots` without host decisions: every root is committed by its own
        success flag (and ``ok``); failures and the last complete refresh are counted on the
        device. No warning names the parameter (the op warns about the failed decomposition)."""
        if not due:
            return
        scaled = [F / bias_correction(beta2, state["step"]) for _p, state, _k, _b, F, _r in due]
        roots, conditions, good = flagged_inverse_roots(scaled, [job[-1] for job in due], *damping)
        done = []
        for (p, state, key, b, _F, _r), root, condition, fine in zip(
            due, roots, conditions, good, strict=True
        ):
            take = fine if ok is None else fine & ok
            commit_(state[f"{key}.inv_root"][b], root, take)
            failed = ~fine if ok is None else ~fine & ok
            counter(state, FAILURES).add_(failed.to(torch.int64))
            self.observe_condition(p, (key, b), condition)
            done.append((p, state, take))
        mark_refreshed_on_device(done, REFRESHED_AT)

    @staticmethod
    def _split_roots(
        due: list[_RootJob],
        compute: Callable[[list[int]], list[InverseRoot | None]],
        split: WorkSplit,
    ) -> list[InverseRoot | None]:
        """Each rank computes its share of the roots; the roots, their condition numbers and
        whether they succeeded reach every rank (a failure is then handled alike everywhere)."""
        specs = []
        costs = []
        for _p, _state, _key, _b, F, _root in due:
            n = F.shape[0]
            costs.append(inverse_root_flops(n) if F.dim() == 2 else diagonal_root_flops(n))
            specs.append(
                [
                    TensorSpec(tuple(F.shape), F.dtype, F.device),
                    TensorSpec((), F.dtype, F.device),  # condition number of the damped factor
                    TensorSpec((), torch.bool, F.device),  # succeeded
                ]
            )

        def payloads(indices: list[int]) -> list[list[Tensor]]:
            out = []
            for i, result in zip(indices, compute(indices), strict=True):
                F = due[i][4]
                if result is None:
                    failed = F.new_zeros((), dtype=torch.bool)
                    out.append([torch.zeros_like(F), F.new_zeros(()), failed])
                else:
                    condition = result.condition.to(F.dtype)
                    out.append([result.root, condition, F.new_ones((), dtype=torch.bool)])
            return out

        shared = split.map("inverse_root", costs, specs, payloads)
        return [
            InverseRoot(root, condition) if bool(ok) else None for root, condition, ok in shared
        ]

    def _shampoo_direction(
        self,
        p: Tensor,
        state: dict[str, Any],
        layout: ShampooLayout,
        exp_avg_hat: Tensor,
        diagonal: Tensor,
        grafting: Grafting,
    ) -> Tensor:
        keys = self._factor_keys(p)
        direction = kernel(block_direction, self.compile_update)
        update = diagonal.clone()  # blocks without a preconditioner keep the diagonal step
        for b, block in enumerate(layout.blocks):
            if not block.preconditioned:
                continue
            roots = [state[f"{key}.inv_root"][b] for key in keys]
            magnitude = None if grafting == "none" else diagonal[block.index]
            update[block.index] = direction(exp_avg_hat[block.index], roots, magnitude)
        return update


shampoo = routed_factory(
    Shampoo,
    "shampoo",
    """A :class:`Shampoo` for a model (routed: :func:`guided_descent.routing.route`) or parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights and the output head go to Shampoo
    and embeddings, norms and biases to AdamW (``routing`` overrides by ``fnmatch`` pattern,
    ``routing_policy`` changes what Shampoo takes, ``example_inputs`` settle the routing at once
    rather than at the first forward pass); given parameters, they are split by shape. The
    other arguments are :class:`Shampoo`'s.
    """,
)


SPEC = register(
    OptimizerSpec(
        name="shampoo",
        family="layer-wise",
        rule="D = L^-1/4 M R^-1/4 per block (order k: F_i^-1/2k); p -= lr * D * |Adam step|/|D|",
        state="2x (first moment, Adam graft) + per block one n×n factor and root per dimension",
        state_buffers=2.0,
        reference="Gupta, Koren & Singer 2018, arXiv 1802.09568; "
        "Anil et al. 2020, arXiv 2002.09018",
        factory=shampoo,
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, epsilon=1e-12),
        routes=True,
    )
)
set_policy(Shampoo.ALGORITHM, Shampoo.ROUTING)
