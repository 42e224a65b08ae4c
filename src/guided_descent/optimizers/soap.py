"""SOAP: Adam in the eigenbasis of Shampoo's factors; AdamW for routed-out parameters.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321. The
update rule lives in :mod:`guided_descent.preconditioners.soap` and the basis refresh in
:mod:`guided_descent.linalg.eigenbasis`; this module is the ``torch.optim`` shell and the
registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from guided_descent.distributed.plan import eigh_flops, qr_refresh_flops
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
from guided_descent.preconditioners.kronecker import compute_dtype, factor_name, kronecker_factor
from guided_descent.preconditioners.refresh import flagged_initial_bases, flagged_refresh_bases
from guided_descent.preconditioners.soap import (
    BasisRefresh,
    MatrixBases,
    initial_bases,
    matrix_factor,
    permute_rotated_,
    project,
    rebase,
    refresh_bases,
    rotated_dims,
    soap_update,
)
from guided_descent.preconditioners.views import FLATTEN, matrix_shape, parse_view
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.cautious import with_group_keys
from guided_descent.transforms.masking import commit_, count_
from guided_descent.transforms.state_dtype import (
    STATE_DTYPE_DEFAULT,
    parse_state_dtype,
)
from guided_descent.transforms.state_dtype import compute_dtype as widest

PREFIX = "soap"
TIEBREAK = 2e-2  # chosen by measurement: see "Well-posed bases" in the class docstring
REFRESH_SHIFT = 1e-3
FAILURES = f"{PREFIX}.failures"
REFRESHED_AT = f"{PREFIX}.refreshed_at"
# The first moment in the rotated space (m' = m ×_i Q_iᵀ). Not "exp_avg": state dicts saved before
# it was kept rotated hold "exp_avg" in the original space, and load_state_dict converts them.
EXP_AVG_ROTATED = f"{PREFIX}.exp_avg_rotated"

# (parameter, its state, dimension, factor key) of one basis to compute or refresh
_BasisJob = tuple[Tensor, dict[str, Any], int, str]


class SOAP(KroneckerOptimizer):
    """SOAP (Vyas et al. 2024, arXiv 2409.11321) with AdamW for groups tagged ``"adamw"``.

    Update of a parameter ``W`` of a ``"soap"`` group, gradient ``G``, bases ``Q_i`` of the
    dimensions of length ``2 .. max_precond_dim`` of a >= 2-D parameter (identity elsewhere), all
    in float32 (float64 for float64 parameters); ``t`` counts Adam updates::

        G' = G ×_i Q_iᵀ                         (matrix: Q_Lᵀ G Q_R)
        m' = beta1 m' + (1 - beta1) G'          (rotated space: m' = m ×_i Q_iᵀ)
        v' = beta2 v' + (1 - beta2) G'²         (rotated space)
        N  = [m' / (1 - beta1^t) / (sqrt(v' / (1 - beta2^t)) + eps)] ×_i Q_i
        W  = W (1 - lr weight_decay) - lr N
        F_i = shampoo_beta F_i + (1 - shampoo_beta) G_(i) G_(i)ᵀ
        if t % precondition_frequency == 0:  Q_i ← qr(F_i Q_i) (sorted power step),
            m' ← m' ×_i (Q_i,newᵀ Q_i,old), v' permuted

    The paper writes the first moment ``m`` in the original space and rotates it every step;
    keeping ``m' = m ×_i Q_iᵀ`` instead is the same step for orthogonal bases (the moment is
    linear in the gradients) with one rotation fewer per step -- six products with a matrix's
    bases instead of eight: a median step 0.84-0.89x pytorch_optimizer's SOAP on 256-wide MLPs
    on one CPU thread (docs/benchmarks.md) -- and a change of basis of ``m'`` at each refresh.

    The first gradient a parameter with bases receives only fills ``F_i`` and sets ``Q_i`` to
    their eigenvectors by a full ``eigh``; the parameter first moves on its second step, so that
    no gradient is ever projected on a basis built from itself (the paper's implementation does
    the same). Parameters without bases (vectors, scalars, all dimensions too long) are plain
    AdamW from their first step. Bias correction and ``eps`` sit as in ``torch.optim.AdamW``, and
    weight decay is applied before the step as there (the paper's code decays after it), so with
    identity bases SOAP equals ``torch.optim.AdamW``.

    **Well-posed bases** (the defaults ``tiebreak=2e-2``, ``refresh_shift=1e-3``). The first basis
    is an ``eigh`` of a factor built from one gradient: rank-deficient, so inside its null space
    the eigenvectors are whatever rounding makes them, and Adam then normalizes each of those
    arbitrary coordinates; later power-step refreshes normalize rounding in the same null space
    again. A relative gradient noise of 1e-7, or the batch as two accumulated halves, changed the
    displacement after 10 steps by 40 % (a 20-64-64-5 tanh MLP; AdamW: 5e-7). Measured
    (displacement change after 10 / 30 steps on that MLP and on a small ReLU CNN; final metric
    over 3 seeds on the eight CPU ``bench train`` workloads):

    ==========================  =====================  ===================================
    setting                     MLP / CNN, 30 steps    quality vs the references' setting
    ==========================  =====================  ===================================
    references (0, 0)           3e-1 / --              --
    tiebreak 1e-2 alone         2e-3 / --              --
    tiebreak 1e-2, shift 1e-3   7e-5 / 8e-3            level (kron-quadratic 5 % worse)
    tiebreak 2e-2, shift 1e-3   1e-4 / 5e-6            level, but mnist1d-transformer 1 point
                                                       lower (0.903 vs 0.913; ranges overlap)
    tiebreak 3e-2, shift 1e-3   5e-5 / 2e-6            transformer 1.2 points lower
    ==========================  =====================  ===================================

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``). Untagged
            groups are split by shape like every matrix method's: >= 2-D to SOAP, the rest to
            AdamW; a group tagged ``"soap"`` may hold vectors and scalars too (plain Adam inside
            it). Use :func:`soap` on a model to route embeddings, the head, norms and biases.
        lr: learning rate. Default 3e-3 (the paper's).
        betas: Adam's ``(beta1, beta2)``. Default (0.95, 0.95).
        eps: Adam's denominator term. Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.01.
        shampoo_beta: EMA coefficient of the factors; ``None`` (default) uses ``beta2``.
        precondition_frequency: Adam steps between eigenbasis refreshes. Default 10.
        stagger_refresh: spread the parameters' basis refreshes over the
            ``precondition_frequency`` steps between refreshes, balanced by cost (each parameter
            still refreshes once per period), so that no step pays for all of them. Default
            True; False: every basis on the same step, as the references do.
        max_precond_dim: dimensions longer than this keep the identity basis. Default 10000;
            0 turns SOAP into AdamW.
        tiebreak: how far apart (relative to ``‖F‖``) two eigen-directions must be for the
            first basis to resolve them; closer ones are ordered along the coordinate axes
            (:func:`~guided_descent.preconditioners.soap.tiebroken`). Default 2e-2; 0 is the
            references' ``eigh`` as it comes.
        refresh_shift: the power-step refresh works on ``F + refresh_shift · (tr F / n) · I``,
            so that directions without signal keep their basis vectors. Default 1e-3; 0 is the
            references' refresh.
        matrix_view: how a parameter is seen (:mod:`guided_descent.preconditioners.views`):
            ``"flatten"`` (default) rotates it as the tensor it is, one basis per dimension;
            ``"split:K"`` and ``"batch"`` rotate each of its matrices by bases of its own (routing
            sets these per group for attention, recurrent and expert weights).
        compile_update: run the moment update and rotation (:func:`~guided_descent.
            preconditioners.soap.soap_update`) through ``torch.compile(fullgraph=True)``; the
            factor statistics and basis refreshes stay eager
            (:mod:`guided_descent.optimizers.compiled`). Default False (eager; measured in
            docs/benchmarks.md).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: hyper-parameters of the AdamW groups;
            ``None`` (default) takes ``lr``, ``betas``, ``eps``, ``weight_decay``.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        state_dtype: the dtype the Adam moments (``soap.exp_avg_rotated``, ``exp_avg_sq``) are
            stored in: ``None`` (default) float32 (float64 for float64 parameters), as the rest
            of the state, even for a bfloat16 model; ``torch.bfloat16`` halves them
            (``torch.float32`` or the names ``"bfloat16"``/``"float32"`` are accepted too). A
            step reads them widened to float32, computes what the float32 path computes and
            rounds into them once (:mod:`guided_descent.transforms.state_dtype`); a basis refresh
            carries the first moment to the new basis in float32 from the widened buffer and
            rounds it once. The Kronecker factors and their eigenbases stay float32 (bf16 would
            move the bases themselves). The AdamW groups keep torch's AdamW state, in the
            parameter's dtype.
        distributed: split the eigendecompositions and basis refreshes between data-parallel
            replicas (each by one rank, balanced by FLOPs, then all-gathered). ``None``
            (default): only when :func:`soap` is given a DDP module; ``True``, a process group
            or a :class:`~guided_descent.distributed.WorkSplit`: always; ``False``: never. An
            FSDP2-sharded (DTensor) parameter is always handled by one owner rank, which keeps
            its whole state, receives the gradient shards and sends the update shards back.

    State per SOAP parameter (float32, or float64): ``step``; ``soap.exp_avg_rotated``
    (``m'``, the first moment in the rotated space: ``m ×_i Q_iᵀ``); ``exp_avg_sq`` (``v'``,
    rotated space) -- these two in ``state_dtype`` when it is given; per rotated dimension
    ``soap.L``/``soap.R`` (matrices) or ``soap.dim{i}``, the ``(n, n)`` factor, and
    ``soap.L.basis`` etc., its eigenbasis;
    ``soap.failures``: basis computations that failed (the previous basis, or the identity, is
    kept and one warning is issued per parameter); ``soap.refreshed_at``: the step of the last
    basis computation in which all of the parameter's bases succeeded (``diagnostics()``
    reports the age ``step - refreshed_at`` and a condition-number estimate of the factors from
    the refresh's Rayleigh quotients). Which dimensions are rotated is fixed when a parameter's
    state is created. A state dict saved when the first moment was kept in the original space
    (``exp_avg``) is converted on loading: rotated into the bases saved with it.
    """

    ALGORITHM = "soap"
    # What this method takes from a model (guided_descent.routing): hidden matrices only.
    ROUTING = RoutingPolicy()
    STATE_NAME = "SOAP"
    # State keys start with PREFIX; a variant (KL-SOAP, KL-Shampoo) names its own.
    PREFIX: ClassVar[str] = PREFIX
    FAILURES: ClassVar[str] = FAILURES
    REFRESHED_AT: ClassVar[str] = REFRESHED_AT
    # Whether the state holds Adam's rotated second moment ``exp_avg_sq`` (KL-Shampoo: no).
    SECOND_MOMENT: ClassVar[bool] = True
    # The first moment's state key, and whether it lives in the rotated space (then each basis
    # refresh carries it to the new basis, and a saved "exp_avg" is converted on loading).
    EXP_AVG: ClassVar[str] = EXP_AVG_ROTATED
    ROTATED_EXP_AVG: ClassVar[bool] = True
    # Whether the power step sorts the basis by its Rayleigh quotients (refresh_eigenbasis).
    SORTED_REFRESH: ClassVar[bool] = True

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
        stagger_refresh: bool = True,
        max_precond_dim: int = 10000,
        matrix_view: str = "flatten",
        tiebreak: float = TIEBREAK,
        refresh_shift: float = REFRESH_SHIFT,
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
            shampoo_beta=shampoo_beta,
            precondition_frequency=precondition_frequency,
            stagger_refresh=stagger_refresh,
            max_precond_dim=max_precond_dim,
            matrix_view=matrix_view,
            tiebreak=tiebreak,
            refresh_shift=refresh_shift,
        )
        validate_hyperparams(self.PREFIX, defaults)
        self.compile_update = check_compile_update(self.PREFIX, compile_update)
        adamw = adamw_defaults(
            adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, inherit=defaults
        )
        # After adamw_defaults: AdamW groups keep torch's state and take no state_dtype.
        defaults["state_dtype"] = parse_state_dtype(self.PREFIX, state_dtype)
        super().__init__(params, defaults, adamw, on_nonfinite, distributed, router)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        shape = tuple(p.shape)
        keys = ("step", self.EXP_AVG, "exp_avg_sq", self.FAILURES)
        shapes: dict[str, tuple[int, ...]] = {self.EXP_AVG: shape, "exp_avg_sq": shape}
        stack = self._matrices(p, group)
        for _d, key, n in self._rotations(p, group):
            factor = (n, n) if stack is None else (stack[0], n, n)
            shapes[key] = shapes[f"{key}.basis"] = factor
        return keys, shapes

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state.get(p)
        if not state:
            return {}
        rotated = bool(self._factor_keys(p, group, state))
        return {
            "preconditioner": "eigenbasis" if rotated else None,
            "preconditioner_age": refresh_age(state, self.REFRESHED_AT) if rotated else None,
            "condition_number": self.worst_condition(p),
            "failures": int(state.get(self.FAILURES, 0)),
        }

    @staticmethod
    def _matrices(p: Tensor, group: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """``(count, m, n)`` when the group's view makes ``p`` a stack of matrices, each with
        bases of its own; ``None`` for the tensor path (``"flatten"``, or fewer than 2-D)."""
        view = group.get("matrix_view", FLATTEN)
        if p.dim() < 2 or parse_view(view)[0] == FLATTEN:
            return None
        return matrix_shape(p.shape, view)

    def _rotations(self, p: Tensor, group: Mapping[str, Any]) -> list[tuple[int, str, int]]:
        """``(dim, state key, length)`` of every rotated dimension. Tensor path: the dimensions
        of ``p`` (:func:`rotated_dims`); stack path: 1 (rows, "L") and 2 (columns, "R") of the
        ``(count, m, n)`` view, each when ``2 <= length <= max_precond_dim``."""
        stack = self._matrices(p, group)
        limit = group["max_precond_dim"]
        if stack is None:
            dims = rotated_dims(tuple(p.shape), limit)
            return [(d, f"{self.PREFIX}.{factor_name(d, p.dim())}", p.shape[d]) for d in dims]
        return [
            (side, f"{self.PREFIX}.{name}", stack[side])
            for side, name in ((1, "L"), (2, "R"))
            if 1 < stack[side] <= limit
        ]

    def _init_state(self, state: dict[str, Any], p: Tensor, group: Mapping[str, Any]) -> None:
        dtype = compute_dtype(p.dtype)
        # The moments in the group's state_dtype (None: the factors' dtype, as before the option).
        stored = parse_state_dtype(self.PREFIX, group.get("state_dtype")) or dtype
        # On the parameter's device, so that a sync-free step updates it there.
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
        state[self.EXP_AVG] = torch.zeros(p.shape, dtype=stored, device=p.device)
        if self.SECOND_MOMENT:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=stored, device=p.device)
        state[self.FAILURES] = torch.zeros((), dtype=torch.int64, device=p.device)
        state["calls"] = 0  # gradients processed, counted on the host (the refresh schedule)
        stack = self._matrices(p, group)
        lead = () if stack is None else (stack[0],)
        for _d, key, n in self._rotations(p, group):
            state[key] = torch.zeros(*lead, n, n, dtype=dtype, device=p.device)
            eye = torch.eye(n, dtype=dtype, device=p.device)
            state[f"{key}.basis"] = eye.expand(*lead, n, n).clone()

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        self._init_state(self.state[p], p, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's load (state in the dtype it was saved in: bf16 moments stay bf16); a group
        saved before ``state_dtype`` existed loads with ``None``, a first moment saved in the
        original space is converted (:meth:`_converted`)."""
        state_dict = with_group_keys(state_dict, STATE_DTYPE_DEFAULT, self.ALGORITHM)
        super().load_state_dict(self._converted(state_dict))

    def _converted(self, state_dict: Any) -> Any:
        """``state_dict`` with every first moment saved in the original space (``exp_avg``, before
        it was kept rotated) replaced by ``EXP_AVG``, rotated into the bases saved with it --
        those the saving code would have rotated it by on its next step. Anything else is left
        as it is, for :func:`~guided_descent.optimizers.checkpoint.check_state_dict` to judge."""
        if not self.ROTATED_EXP_AVG or not isinstance(state_dict, Mapping):
            return state_dict
        groups, saved = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved, Mapping):
            return state_dict
        converted = dict(saved)
        for group in groups:
            if not isinstance(group, Mapping) or group.get("algorithm") != self.ALGORITHM:
                continue
            for saved_id in group.get("params", ()):
                entry = saved.get(saved_id)
                if (
                    isinstance(entry, Mapping)
                    and self.EXP_AVG not in entry
                    and isinstance(entry.get("exp_avg"), Tensor)
                    and "max_precond_dim" in group
                ):
                    moment = self._rotated_into_saved_bases(entry, group)
                    converted[saved_id] = {
                        **{k: v for k, v in entry.items() if k != "exp_avg"},
                        self.EXP_AVG: moment,
                    }
        return {**state_dict, "state": converted}

    def _rotated_into_saved_bases(
        self, entry: Mapping[str, Any], group: Mapping[str, Any]
    ) -> Tensor:
        """``exp_avg ×_i Q_iᵀ`` of one saved parameter state (see :meth:`_converted`)."""
        m = entry["exp_avg"]
        stack = self._matrices(m, group)  # the parameter's view; exp_avg has its shape
        lead = () if stack is None else (stack[0],)
        # A basis of the wrong shape is not used here; check_state_dict refuses it afterwards.
        found = {
            d: entry[f"{key}.basis"]
            for d, key, n in self._rotations(m, group)
            if isinstance(entry.get(f"{key}.basis"), Tensor)
            and tuple(entry[f"{key}.basis"].shape) == (*lead, n, n)
        }
        # Rotated in the bases' dtype and kept in the moment's own (bf16 state: rounded once).
        wide = m.to(widest(m, *found.values()))
        if stack is None:
            moment = project(wide, [found.get(d) for d in range(m.dim())])
        else:
            moment = project(wide.reshape(stack), MatrixBases(found.get(1), found.get(2)))
        return moment.reshape(m.shape).to(m.dtype, copy=True)

    def _factor_keys(
        self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]
    ) -> list[tuple[int, str]]:
        """``(dim, key)`` of the rotated dimensions whose state exists (fixed at creation)."""
        return [(d, key) for d, key, _n in self._rotations(p, group) if key in state]

    def updates(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, Tensor]],
        split: WorkSplit | None,
        consume: Callable[[int, Tensor], None],
        ok: Tensor | None = None,
    ) -> None:
        """Advance the state of every ``(parameter, full gradient)``; hand the update ``N`` of
        each parameter that moves this step (not on its first gradient, see the class
        docstring) to ``consume(index, N)``. ``split`` shares the work of the bases.

        A sync-free step (:attr:`_sync_free_step`) reads no counter on the host: the refresh
        schedule follows ``state["calls"]`` (host int: gradients processed), bias corrections
        the ``step`` tensor, and with ``ok`` every state tensor changes only where ``ok`` is true.
        (A skip on a parameter's very first gradient then leaves its factors empty and its bases
        the identity until its first refresh.)"""
        sync_free = self._sync_free_step
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        fresh: list[_BasisJob] = []
        due: list[_BasisJob] = []
        lr = float(group["lr"])

        for i, (p, raw_grad) in enumerate(items):
            state = self.state[p]
            grad = raw_grad.to(compute_dtype(p.dtype))  # p.grad itself is never written
            if not state:
                self._init_state(state, p, group)
            is_new = state["calls"] == 0
            state["calls"] += 1
            factors = self._factor_keys(p, group, state)
            stack = self._matrices(p, group)
            if stack is not None:  # (count, m, n) views: one rotation per matrix
                grad = grad.reshape(stack)

            if is_new and factors:
                # First gradient: statistics and the first basis only (see the class docstring).
                self._accumulate_factors(
                    group, state, grad, stack, factors, shampoo_beta, ok, first=True
                )
                fresh.extend((p, state, d, key) for d, key in factors)
                self._observe(p, update_rms=grad.new_zeros(()))  # it did not move
                continue

            count_(state["step"], ok)
            # The schedule's step (Adam updates: the first gradient of a parameter with bases
            # only built them): the host's count when the step is sync-free, else the exact one.
            t = state["calls"] - bool(factors) if sync_free else int(state["step"].item())
            bases: Any
            if stack is None:
                bases = [None] * p.dim()
                for d, key in factors:
                    bases[d] = state[f"{key}.basis"]
            else:
                found = {d: state[f"{key}.basis"] for d, key in factors}
                bases = MatrixBases(found.get(1), found.get(2))
            # A tensor for a compiled update too: a host int would be a new constant every step.
            step = state["step"] if sync_free or self.compile_update else t
            update = self._direction(group, state, grad, stack, bases, step, ok).reshape(p.shape)
            self._observe(p, update_rms=rms(update, lr))
            consume(i, update)
            # After the step, so that this gradient is not used to rotate itself.
            self._accumulate_factors(
                group, state, grad, stack, factors, shampoo_beta, ok, first=False
            )
            freq = group["precondition_frequency"]
            if factors and t >= freq and (t - self.refresh_slot(p, group)) % freq == 0:
                due.extend((p, state, d, key) for d, key in factors)

        if sync_free:
            self._initial_bases_flagged(fresh, ok, group)
            self._refresh_bases_flagged(due, ok, group)
        else:
            self._initial_bases(fresh, split, group)
            self._refresh_bases(due, split, group)

    def restore_counts(self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        # Gradients processed: the Adam steps, plus the first gradient that built the bases.
        state["calls"] = int(state["step"].item()) + bool(self._factor_keys(p, group, state))

    def _direction(
        self,
        group: Mapping[str, Any],
        state: dict[str, Any],
        grad: Tensor,
        stack: tuple[int, int, int] | None,
        bases: Any,
        step: int | Tensor,
        ok: Tensor | None,
    ) -> Tensor:
        """Advance the moments by ``grad`` (in the group's view: ``stack`` or the tensor) and
        return the update in that view (SOAP: :func:`soap_update`)."""
        beta1, beta2 = group["betas"]
        return kernel(soap_update, self.compile_update)(
            grad,
            state[self.EXP_AVG] if stack is None else state[self.EXP_AVG].view(stack),
            state["exp_avg_sq"] if stack is None else state["exp_avg_sq"].view(stack),
            bases,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step=step,
            ok=ok,
        )

    def _accumulate_factors(
        self,
        group: Mapping[str, Any],
        state: dict[str, Any],
        grad: Tensor,
        stack: tuple[int, int, int] | None,
        factors: list[tuple[int, str]],
        shampoo_beta: float,
        ok: Tensor | None,
        first: bool,
    ) -> None:
        """``F_i = shampoo_beta F_i + (1 - shampoo_beta) G_(i) G_(i)ᵀ`` for every rotated
        dimension ``(i, key)`` of ``factors`` (``first``: the parameter's first gradient)."""
        for d, key in factors:
            if stack is not None:
                statistic = matrix_factor(grad, d)
            elif grad.dim() == 2:  # G Gᵀ or Gᵀ G: kronecker_factor's value without its copies
                statistic = matrix_factor(grad, d + 1)
            else:
                statistic = kronecker_factor(grad, d)
            self._accumulate(state[key], statistic, shampoo_beta, ok)

    def _reorder(
        self, state: dict[str, Any], d: int, key: str, b: int | None, order: Tensor, take: Any
    ) -> None:
        """Re-index what lives in the rotated coordinates of dimension ``d`` (SOAP: the second
        moment) after its basis (matrix ``b`` of a stack, or ``None``) was re-ordered by
        ``order``; ``take`` (a 0-d bool tensor) commits it on a sync-free step, ``None``: at
        once."""
        if b is None:
            moment, dim = state["exp_avg_sq"], d
        else:
            # Matrix b of a (count, m, n) stack: its own rows or columns (dimension d - 1 of the
            # matrix) of the rotated second moment.
            count, n = state[key].shape[0], state[key].shape[-1]
            shape = (count, n, -1) if d == 1 else (count, -1, n)
            moment, dim = state["exp_avg_sq"].view(shape)[b], d - 1
        if take is None:
            permute_rotated_(moment, dim, order)
        else:
            commit_(moment, moment.index_select(dim, order), take)

    def _rebase_exp_avg(
        self, state: dict[str, Any], d: int, key: str, b: int | None, new: Tensor, take: Any
    ) -> None:
        """Carry the rotated first moment along dimension ``d`` from its current basis (matrix
        ``b`` of a stack, or ``None``) to ``new`` (:func:`rebase`), before the basis is replaced;
        ``take`` as in :meth:`_reorder`. Nothing for a first moment kept in the original space.

        Only refreshes need it: the first basis of a parameter is computed on its first gradient,
        before any Adam step, when the first moment is still zero."""
        if not self.ROTATED_EXP_AVG:
            return
        if b is None:
            moment, dim, old = state[self.EXP_AVG], d, state[f"{key}.basis"]
        else:  # matrix b of a (count, m, n) stack, as in _reorder
            count, n = state[key].shape[0], state[key].shape[-1]
            shape = (count, n, -1) if d == 1 else (count, -1, n)
            moment, dim = state[self.EXP_AVG].view(shape)[b], d - 1
            old = state[f"{key}.basis"][b]
        moved = rebase(moment, dim, old, new)  # widened (bf16 state): rounded once, on the copy
        if take is None:
            moment.copy_(moved)
        else:
            commit_(moment, moved, take)

    @staticmethod
    def _accumulate(F: Tensor, statistic: Tensor, shampoo_beta: float, ok: Tensor | None) -> None:
        if ok is None:
            F.lerp_(statistic, 1.0 - shampoo_beta)
        else:
            commit_(F, F.lerp(statistic, 1.0 - shampoo_beta), ok)

    def refresh_costs(self, p: Tensor, group: Mapping[str, Any]) -> list[float]:
        """One refresh unit per parameter: the power steps of all its rotated dimensions."""
        rotations = self._rotations(p, group)
        if not rotations:
            return []
        stack = self._matrices(p, group)
        count = 1 if stack is None else stack[0]
        return [sum(count * qr_refresh_flops(n) for _d, _key, n in rotations)]

    def cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """Estimated FLOPs per step of a parameter's update: three mode products with each
        rotated dimension's basis (gradient in, direction out; the first moment is kept rotated)
        and its factor statistics (``~2 numel n`` each), plus the basis refresh amortized over
        ``precondition_frequency``."""
        cost = float(p.numel())
        stack = self._matrices(p, group)
        count = 1 if stack is None else stack[0]
        for _d, _key, n in self._rotations(p, group):
            refresh = count * qr_refresh_flops(n) / group["precondition_frequency"]
            cost += 8.0 * p.numel() * n + refresh
        return cost

    @staticmethod
    def _slices(
        jobs: list[_BasisJob], key_suffix: str = ""
    ) -> list[tuple[int, int | None, Tensor]]:
        """``(job, matrix index or None, tensor)`` for the factors (or bases) of ``jobs``: a
        stacked ``(count, n, n)`` state contributes each of its matrices."""
        out: list[tuple[int, int | None, Tensor]] = []
        for j, (_p, state, _d, key) in enumerate(jobs):
            value = state[key + key_suffix]
            if value.dim() == 3:
                out.extend((j, b, value[b]) for b in range(value.shape[0]))
            else:
                out.append((j, None, value))
        return out

    def _initial_bases(
        self, jobs: list[_BasisJob], split: WorkSplit | None, group: Mapping[str, Any]
    ) -> None:
        if not jobs:
            return
        slices = self._slices(jobs)
        factors = [F for _j, _b, F in slices]
        if split is None:
            bases = initial_bases(factors, group["tiebreak"])
        else:
            bases = self._split_initial_bases(factors, split, group["tiebreak"])
        failed: set[int] = set()
        for (j, b, _F), basis in zip(slices, bases, strict=True):
            p, state, _d, key = jobs[j]
            if basis is None:  # keeps the identity basis it was created with
                failed.add(id(p))
                what = f"the eigendecomposition of {key}"
                warn_failure(self.PREFIX, state, self.FAILURES, tuple(p.shape), what)
                continue
            if b is None:
                state[f"{key}.basis"] = basis
            else:
                state[f"{key}.basis"][b] = basis
        mark_refreshed(((p, state) for p, state, _d, _key in jobs), failed, self.REFRESHED_AT)

    def _initial_bases_flagged(
        self, jobs: list[_BasisJob], ok: Tensor | None, group: Mapping[str, Any]
    ) -> None:
        """:meth:`_initial_bases` without host decisions (see Shampoo's flagged refresh)."""
        if not jobs:
            return
        slices = self._slices(jobs)
        bases, good = flagged_initial_bases([F for _j, _b, F in slices], group["tiebreak"])
        done = []
        for (j, b, _F), basis, fine in zip(slices, bases, good, strict=True):
            p, state, _d, key = jobs[j]
            take = fine if ok is None else fine & ok
            target = state[f"{key}.basis"] if b is None else state[f"{key}.basis"][b]
            commit_(target, basis, take)
            failed = ~fine if ok is None else ~fine & ok
            counter(state, self.FAILURES).add_(failed.to(torch.int64))
            done.append((p, state, take))
        mark_refreshed_on_device(done, self.REFRESHED_AT)

    def _refresh_bases_flagged(
        self, jobs: list[_BasisJob], ok: Tensor | None, group: Mapping[str, Any]
    ) -> None:
        """:meth:`_refresh_bases` without host decisions (see Shampoo's flagged refresh)."""
        if not jobs:
            return
        slices = self._slices(jobs)
        bases = [Q for _j, _b, Q in self._slices(jobs, ".basis")]
        new_bases, orders, good, conditions = flagged_refresh_bases(
            [F for _j, _b, F in slices], bases, group["refresh_shift"], self.SORTED_REFRESH
        )
        done = []
        for (j, b, _F), basis, order, fine, condition in zip(
            slices, new_bases, orders, good, conditions, strict=True
        ):
            p, state, d, key = jobs[j]
            take = fine if ok is None else fine & ok
            self._rebase_exp_avg(state, d, key, b, basis, take)  # while the old basis is there
            commit_(state[f"{key}.basis"] if b is None else state[f"{key}.basis"][b], basis, take)
            self._reorder(state, d, key, b, order, take)
            failed = ~fine if ok is None else ~fine & ok
            counter(state, self.FAILURES).add_(failed.to(torch.int64))
            self.observe_condition(p, key if b is None else (key, b), condition)
            done.append((p, state, take))
        mark_refreshed_on_device(done, self.REFRESHED_AT)

    @staticmethod
    def _split_initial_bases(
        factors: list[Tensor], split: WorkSplit, tiebreak: float
    ) -> list[Tensor | None]:
        """Each rank decomposes its share; bases and success flags reach every rank."""
        specs = [[TensorSpec.of(F), TensorSpec((), torch.bool, F.device)] for F in factors]

        def compute(indices: list[int]) -> list[list[Tensor]]:
            out = []
            own = initial_bases([factors[i] for i in indices], tiebreak)
            for i, basis in zip(indices, own, strict=True):
                F = factors[i]
                if basis is None:
                    out.append([torch.zeros_like(F), F.new_zeros((), dtype=torch.bool)])
                else:
                    out.append([basis, F.new_ones((), dtype=torch.bool)])
            return out

        costs = [eigh_flops(F.shape[0]) for F in factors]
        shared = split.map("eigh", costs, specs, compute)
        return [basis if bool(ok) else None for basis, ok in shared]

    def _refresh_bases(
        self, jobs: list[_BasisJob], split: WorkSplit | None, group: Mapping[str, Any]
    ) -> None:
        if not jobs:
            return
        slices = self._slices(jobs)
        factors = [F for _j, _b, F in slices]
        bases = [Q for _j, _b, Q in self._slices(jobs, ".basis")]
        if split is None:
            # SOAP calls it as it always has; only a variant passes sort=False.
            unsorted = {} if self.SORTED_REFRESH else {"sort": False}
            results = refresh_bases(factors, bases, group["refresh_shift"], **unsorted)
        else:
            results = self._split_refresh_bases(
                factors, bases, split, group["refresh_shift"], self.SORTED_REFRESH
            )
        failed: set[int] = set()
        for (j, b, _F), result in zip(slices, results, strict=True):
            p, state, d, key = jobs[j]
            if not bool(result.ok):
                failed.add(id(p))
                what = f"the eigenbasis refresh of {key}"
                warn_failure(self.PREFIX, state, self.FAILURES, tuple(p.shape), what)
                continue
            self._rebase_exp_avg(state, d, key, b, result.basis, None)  # from the old basis
            if b is None:
                state[f"{key}.basis"] = result.basis
            else:  # matrix b of a (count, m, n) stack
                state[f"{key}.basis"][b] = result.basis
            self._reorder(state, d, key, b, result.order, None)
            self.observe_condition(p, key if b is None else (key, b), result.condition)
        mark_refreshed(((p, state) for p, state, _d, _key in jobs), failed, self.REFRESHED_AT)

    @staticmethod
    def _split_refresh_bases(
        factors: list[Tensor], bases: list[Tensor], split: WorkSplit, shift: float, sort: bool
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
            results = refresh_bases(
                [factors[i] for i in indices], [bases[i] for i in indices], shift, sort
            )
            return [
                [r.basis, r.order, r.ok, r.condition.to(factors[i].dtype)]
                for i, r in zip(indices, results, strict=True)
            ]

        costs = [qr_refresh_flops(F.shape[0]) for F in factors]
        shared = split.map("qr_refresh", costs, specs, compute)
        return [BasisRefresh(*fields) for fields in shared]


soap = routed_factory(
    SOAP,
    "soap",
    """A :class:`SOAP` for a model (routed: :func:`guided_descent.routing.route`) or parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights go to SOAP and embeddings, the
    output head, norms and biases to AdamW (``routing`` overrides by ``fnmatch`` pattern,
    ``routing_policy`` changes what SOAP takes, ``example_inputs`` settle the routing at once
    rather than at the first forward pass); given parameters, they are split by shape. The
    other arguments are :class:`SOAP`'s.
    """,
)


SPEC = register(
    OptimizerSpec(
        name="soap",
        family="layer-wise",
        rule="Adam on Q_Lᵀ G Q_R (Q: eigenbases of Shampoo's L, R, power-iteration refresh), "
        "rotated back",
        state="2x (first and second moment, both rotated) + per dimension an n×n factor and "
        "basis",
        state_buffers=2.0,
        reference="Vyas et al. 2024, arXiv 2409.11321",
        factory=soap,
        defaults=dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
        routes=True,
    )
)
set_policy(SOAP.ALGORITHM, SOAP.ROUTING)
