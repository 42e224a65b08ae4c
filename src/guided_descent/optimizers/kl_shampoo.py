"""KL-Shampoo and KL-SOAP: Kronecker factors estimated by KL minimisation; AdamW for routed-out
parameters.

Lin, Lowe, Dangel, Eschenhagen, Xu & Grosse 2025, "Understanding and Improving Shampoo and SOAP
via Kullback-Leibler Minimization", arXiv 2509.03378; the authors' code: yorkerlin/KL-Methods
(``optim/kl_opt.py``). The estimation lives in :mod:`guided_descent.preconditioners.kl`.

Both keep SOAP's machinery -- per rotated dimension a factor, its eigenbasis from one ``eigh`` of
the first gradient's factor, then a sorted power step and QR every ``precondition_frequency``
steps, the ``"split:K"``/``"batch"`` views, the sync-free guard, FSDP2 and DDP work splitting --
and change what the factors estimate: they are subclasses of :class:`~.soap.SOAP`, not copies.
KL-Shampoo is built on SOAP's eigenbasis rather than on :class:`~.shampoo.Shampoo`'s inverse
roots because the paper's recommended variant is that: eigenvalues estimated every step in a
QR-refreshed basis, at SOAP's cost per step and without an ``eigh`` per refresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from guided_descent.distributed.split import Distributed
from guided_descent.optimizers.hybrid import adamw_defaults, routed_factory
from guided_descent.optimizers.kronecker import KroneckerOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.soap import REFRESH_SHIFT, SOAP, TIEBREAK
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.kl import (
    eigenvalue_floor,
    kl_statistics,
    kronecker_root,
    update_eigenvalues_,
)
from guided_descent.preconditioners.kronecker import compute_dtype, factor_name
from guided_descent.preconditioners.soap import project, project_back
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.masking import bias_correction, commit_
from guided_descent.transforms.state_dtype import compute_dtype as widest
from guided_descent.transforms.state_dtype import parse_state_dtype

INIT_FACTOR = None  # estimates from the first gradient: see "Initial estimates" in KLSOAP
INVERSE_ROOT_CLAMP = 4000.0  # the authors' cap on d^(-1/2) (at most max(10, min(n, this)))


class KLSOAP(SOAP):
    """KL-SOAP (Lin et al. 2025, arXiv 2509.03378): SOAP whose factors are KL estimates.

    As :class:`~.soap.SOAP` (Adam in the eigenbasis ``Q_i``, the same defaults, the first
    gradient only builds the bases), except for the factors each ``Q_i`` is refreshed from. Per
    dimension ``i`` of a parameter with a rotated dimension (``β = shampoo_beta``, ``N`` entries,
    all in float32, float64 for float64 parameters) ::

        X   = G ×_{j≠i} diag(d_j)^(-1/2) Q_jᵀ          (Q_j = I for a dimension without a basis)
        F_i = β F_i + (1 - β) n_i/N X_(i) X_(i)ᵀ        (matrix: L ← β L + (1-β) G R̂⁻¹ Gᵀ / n)
        d_i = max(β d_i + (1 - β) n_i/N Σ_{others} (X ×_i Q_iᵀ)², 1 / max(10, min(n_i, clamp))²)

    ``F̂_j = Q_j diag(d_j) Q_jᵀ``: ``d_j`` estimates ``F_j``'s eigenvalues in the current basis,
    every step; on the first gradient ``F_i = (1 - β) n_i/N G_(i) G_(i)ᵀ`` (the other factors
    unknown: the identity). The update is SOAP's, from Adam's moments; KL-SOAP keeps ``d_i`` only
    to estimate ``F_i``. See :mod:`~..preconditioners.kl`.

    **Initial estimates** (``init_factor=None``, the default). The authors start every ``d_i`` at
    the constant 0.1, which assumes a gradient scale: the product ``sqrt(d_0 ⊗ d_1)`` divides the
    early steps by 0.1 whatever the gradients' size, and with ``β = 0.95`` it takes some 50 steps
    to adapt. Here the first gradient a parameter receives sets ``d_i = (mean G²)^(1/k)`` for its
    ``k`` dimensions (per matrix of a stack), so that ``d_0 ⊗ ... ⊗ d_{k-1}`` starts at the
    gradient's mean square, as Adam's second moment does (an all-zero first gradient: 1). At 60
    steps on ``tests/test_model_zoo.py``'s six models, final/initial loss of KL-Shampoo with the
    constant 0.1 vs this: 0.149 / 0.117 (tied GPT), 0.484 / 0.414, 0.973 / 0.911 (LSTM), 0.634 /
    0.637 (BN-CNN), 0.683 / 0.609 (MoE), 0.834 / 0.801; KL-SOAP level or slightly better.

    **Unsorted refresh.** As in the authors' code, and unlike SOAP's, the power step is
    ``Q_i ← qr(F_i Q_i)`` without sorting the columns by their Rayleigh quotients. KL factors are
    whitened by the other side's inverse, so their spectra are flatter and two quotients often
    nearly tie; a sort then flips with rounding and QR returns another basis. Measured on
    ``tests/test_sensitivity.py``'s tanh MLP (displacement change after 30 steps under a relative
    gradient noise of 1e-7): KL-SOAP sorted 8e-3, unsorted 1e-4 (SOAP: 1e-4); KL-Shampoo 3e-6
    (its update does not depend on the basis inside a cluster of equal estimates).

    Differences from the authors' code, each SOAP's here: both moments are bias-corrected and
    ``eps`` is placed as in ``torch.optim.AdamW``, weight decay comes before the step,
    ``tiebreak`` and ``refresh_shift`` (0 and 0 are the authors'); and, not SOAP's, the
    estimates' start (``init_factor=0.1`` is the authors'); all state in float32 (their code
    computes in bfloat16). Like theirs, the first moment is kept in the rotated space.

    Args:
        params, lr, betas, eps, weight_decay, shampoo_beta, precondition_frequency,
        stagger_refresh, max_precond_dim, matrix_view, tiebreak, refresh_shift, adamw_*,
        on_nonfinite, state_dtype, distributed: as :class:`~.soap.SOAP` (``state_dtype``: the
        Adam moments; the factors, bases and eigenvalue estimates stay float32).
        init_factor: the eigenvalue estimates' starting value; ``None`` (default): from the
            first gradient (see "Initial estimates"); 0.1 is the authors'.
        inverse_root_clamp: ``d_i^(-1/2)`` is kept at most ``max(10, min(n_i, this))`` (a floor
            on ``d_i``); ``None`` turns the floor off. Default 4000 (the authors').

    State per parameter: SOAP's (the rotated first moment under ``kl_soap.exp_avg_rotated``), plus
    ``{key}.eigenvalues`` ``(n_i,)`` (``(count, n_i)`` on a
    stack) for every dimension of a parameter with a rotated one (``key``: ``kl_soap.L``,
    ``kl_soap.R``, ``kl_soap.dim{i}``).
    """

    ALGORITHM = "kl_soap"
    ROUTING = RoutingPolicy()
    STATE_NAME = "KL-SOAP"
    PREFIX: ClassVar[str] = "kl_soap"
    FAILURES: ClassVar[str] = "kl_soap.failures"
    REFRESHED_AT: ClassVar[str] = "kl_soap.refreshed_at"
    EXP_AVG: ClassVar[str] = "kl_soap.exp_avg_rotated"
    # The authors' power step, unsorted (see "Unsorted refresh" in the docstring).
    SORTED_REFRESH: ClassVar[bool] = False

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
        init_factor: float | None = INIT_FACTOR,
        inverse_root_clamp: float | None = INVERSE_ROOT_CLAMP,
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
            init_factor=init_factor,
            inverse_root_clamp=inverse_root_clamp,
        )
        validate_hyperparams(self.PREFIX, defaults)
        adamw = adamw_defaults(
            adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, inherit=defaults
        )
        defaults["state_dtype"] = parse_state_dtype(self.PREFIX, state_dtype)
        # SOAP's constructor would build SOAP's defaults; the base takes these as they are.
        KroneckerOptimizer.__init__(
            self, params, defaults, adamw, on_nonfinite, distributed, router
        )

    # --- which dimensions carry eigenvalue estimates -------------------------------------------

    def _eigen_dims(self, p: Tensor, group: Mapping[str, Any]) -> list[tuple[int, str, int]]:
        """``(dim, key, length)`` of every dimension of the parameter's working view: the tensor
        (a scalar as ``(1,)``) or the ``(count, m, n)`` stack's dimensions 1 and 2 -- the same
        keys as :meth:`_rotations` for those with a basis."""
        stack = self._matrices(p, group)
        if stack is None:
            shape = tuple(p.shape) or (1,)
            return [(i, f"{self.PREFIX}.{factor_name(i, p.dim())}", n) for i, n in enumerate(shape)]
        return [(1, f"{self.PREFIX}.L", stack[1]), (2, f"{self.PREFIX}.R", stack[2])]

    def _estimates_eigenvalues(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        """KL-SOAP needs the estimates only to refresh bases: with a rotated dimension."""
        return bool(self._rotations(p, group))

    def _init_state(self, state: dict[str, Any], p: Tensor, group: Mapping[str, Any]) -> None:
        super()._init_state(state, p, group)
        if not self._estimates_eigenvalues(p, group):
            return
        stack = self._matrices(p, group)
        lead = () if stack is None else (stack[0],)
        # With init_factor None, 1 until the first gradient sets them (_initial_estimates_).
        start = 1.0 if group["init_factor"] is None else group["init_factor"]
        for _d, key, n in self._eigen_dims(p, group):
            state[f"{key}.eigenvalues"] = torch.full(
                (*lead, n), start, dtype=compute_dtype(p.dtype), device=p.device
            )

    def _initial_estimates_(
        self, group: Mapping[str, Any], state: dict[str, Any], grad: Tensor, stack: Any, ok: Any
    ) -> None:
        """``d_i = (mean G²)^(1/k)`` from a parameter's first gradient (``init_factor=None``)."""
        if group["init_factor"] is not None:
            return
        x, batch, keys = self._working_view(state, grad, stack)
        if f"{keys[0]}.eigenvalues" not in state:
            return
        mean_square = x.square().mean(dim=tuple(range(batch, x.dim())))  # (*batch)
        # An all-zero gradient carries no scale: keep 1 rather than an estimate of 0.
        root = torch.where(mean_square > 0, mean_square.pow(1.0 / len(keys)), 1.0)
        clamp = group["inverse_root_clamp"]
        for i, key in enumerate(keys):
            d = state[f"{key}.eigenvalues"]
            floor = eigenvalue_floor(x.shape[batch + i], clamp)
            new = root.clamp_min(floor).unsqueeze(-1).expand_as(d)
            if ok is None:
                d.copy_(new)
            else:
                commit_(d, new, ok)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        keys, shapes = super().matrix_state(p, group)
        shapes = dict(shapes)
        if not self.SECOND_MOMENT:
            keys = tuple(k for k in keys if k != "exp_avg_sq")
            del shapes["exp_avg_sq"]
        if self._estimates_eigenvalues(p, group):
            stack = self._matrices(p, group)
            lead = () if stack is None else (stack[0],)
            for _d, key, n in self._eigen_dims(p, group):
                keys += (f"{key}.eigenvalues",)
                shapes[f"{key}.eigenvalues"] = (*lead, n)
        return keys, shapes

    # --- the estimation ------------------------------------------------------------------------

    def _working_view(
        self, state: Mapping[str, Any], grad: Tensor, stack: tuple[int, int, int] | None
    ) -> tuple[Tensor, int, list[str]]:
        """``(grad, batch dimensions, key per dimension)`` as the estimation sees it (see
        :meth:`_eigen_dims`; ``grad`` is already the stack when there is one)."""
        if stack is not None:
            return grad, 1, [f"{self.PREFIX}.L", f"{self.PREFIX}.R"]
        x = grad.reshape(grad.shape or (1,))
        return x, 0, [f"{self.PREFIX}.{factor_name(i, grad.dim())}" for i in range(x.dim())]

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
        x, batch, keys = self._working_view(state, grad, stack)
        numel = x[(0,) * batch].numel()  # N: the entries of one matrix of a stack
        if first:
            # No estimate of the other factors yet: the identity (the authors' first step).
            for d, key in factors:
                moved = x.movedim(d, batch)
                flat = moved.reshape(*moved.shape[: batch + 1], -1)  # (*batch, n_d, rest)
                statistic = (flat @ flat.mT) * (x.shape[d] / numel)
                self._accumulate(state[key], statistic, shampoo_beta, ok)
            self._initial_estimates_(group, state, grad, stack, ok)
            return
        if f"{keys[0]}.eigenvalues" not in state:
            return  # no rotated dimension (KL-SOAP): plain Adam, nothing to estimate
        rotated = dict(factors)
        offset = batch  # dims of x: batch dimensions first
        bases = [
            state[f"{rotated[offset + i]}.basis"] if offset + i in rotated else None
            for i in range(len(keys))
        ]
        eigenvalues = [state[f"{key}.eigenvalues"] for key in keys]
        statistics, diagonals = kl_statistics(x, bases, eigenvalues, batch)
        for i, statistic in enumerate(statistics):
            if statistic is not None:
                self._accumulate(state[rotated[offset + i]], statistic, shampoo_beta, ok)
        clamp = group["inverse_root_clamp"]
        floors = [eigenvalue_floor(x.shape[offset + i], clamp) for i in range(len(keys))]
        update_eigenvalues_(eigenvalues, diagonals, shampoo_beta, floors, ok)

    def _reorder(
        self, state: dict[str, Any], d: int, key: str, b: int | None, order: Tensor, take: Any
    ) -> None:
        if self.SECOND_MOMENT:
            super()._reorder(state, d, key, b, order, take)
        # The estimates follow their basis vectors.
        values = state[f"{key}.eigenvalues"] if b is None else state[f"{key}.eigenvalues"][b]
        moved = values.index_select(-1, order)
        if take is None:
            values.copy_(moved)
        else:
            commit_(values, moved, take)


class KLShampoo(KLSOAP):
    """KL-Shampoo (Lin et al. 2025, arXiv 2509.03378) with AdamW for groups tagged ``"adamw"``.

    Shampoo's preconditioner with KL-estimated factors, ``(L ⊗ R)^(-1/2)``, applied through the
    factors' eigenbases and per-step eigenvalue estimates, without grafting. Update of a
    parameter ``W`` of a ``"kl_shampoo"`` group, gradient ``G``, first moment ``m``; the factors
    ``F_i``, bases ``Q_i`` and estimates ``d_i`` as :class:`KLSOAP`'s, and every dimension
    carries an estimate (a dimension without a basis: ``Q_i = I``, a diagonal factor) ::

        m  = beta1 m + (1 - beta1) G
        N  = [((m ×_i Q_iᵀ) / (1 - beta1^t)) / (sqrt(d_0 ⊗ d_1 ⊗ ...) + eps)] ×_i Q_i
             (matrix: Q_L [Q_Lᵀ M Q_R / (sqrt(d_L d_Rᵀ) + eps)] Q_Rᵀ ≈ L̂^(-1/2) M R̂^(-1/2))
        W  = W (1 - lr weight_decay) - lr N
        then F_i, d_i from G (the update used the previous ones), and every
        precondition_frequency steps Q_i ← qr(F_i Q_i) (one power step).

    A parameter with a basis moves from its second gradient (the first builds the bases, as
    SOAP's); a vector or scalar (all dimensions diagonal: RMSprop with ``d`` from
    ``init_factor``) from its first. The state is one moment smaller than SOAP's.

    Differences from the authors' code: ``m`` is bias-corrected (as Adam's, so that Adam's
    learning rates apply from the first steps; theirs is not), weight decay comes before the step,
    ``tiebreak`` and ``refresh_shift`` as SOAP's, the estimates' start from the first gradient
    (``init_factor=None``; theirs: 0.1, see :class:`KLSOAP`), any number of dimensions (theirs:
    2-D and 3-D) with diagonal factors for dimensions without a basis, float32 state (theirs:
    bfloat16 computations). The power step is unsorted, as theirs (see :class:`KLSOAP`).

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``); untagged
            groups are split by shape (>= 2-D to KL-Shampoo, the rest to AdamW). Use
            :func:`kl_shampoo` on a model to route embeddings, the head, norms and biases.
        lr: learning rate. Default 3e-3.
        betas: ``(beta1, beta2)``: the first moment's EMA; ``beta2`` is the factors' and
            estimates' EMA unless ``shampoo_beta`` is given. Default (0.95, 0.95).
        eps: added to ``sqrt(d_0 ⊗ d_1 ...)`` (the authors' damping). Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.01.
        shampoo_beta, precondition_frequency, max_precond_dim, matrix_view, tiebreak,
            refresh_shift, adamw_*, on_nonfinite, distributed: as :class:`~.soap.SOAP`.
        state_dtype: the dtype ``exp_avg`` is stored in, as :class:`~.soap.SOAP`'s moments
            (``None``: float32; the factors, bases and estimates stay float32).
        init_factor, inverse_root_clamp: as :class:`KLSOAP`.

    State per parameter (float32, or float64): ``step``, ``exp_avg``, the factors and bases of
    the rotated dimensions (``kl_shampoo.L``, ``kl_shampoo.L.basis``, ...), an estimate
    ``{key}.eigenvalues`` per dimension, ``kl_shampoo.failures``, ``kl_shampoo.refreshed_at``.
    """

    ALGORITHM = "kl_shampoo"
    ROUTING = RoutingPolicy()
    STATE_NAME = "KL-Shampoo"
    PREFIX: ClassVar[str] = "kl_shampoo"
    FAILURES: ClassVar[str] = "kl_shampoo.failures"
    REFRESHED_AT: ClassVar[str] = "kl_shampoo.refreshed_at"
    SECOND_MOMENT: ClassVar[bool] = False
    # Its first moment stays in the original space: _direction below rotates it every step.
    EXP_AVG: ClassVar[str] = "exp_avg"
    ROTATED_EXP_AVG: ClassVar[bool] = False

    def _estimates_eigenvalues(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        return True  # the update itself is built from them

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
        if state["calls"] == 1:
            # A parameter without a basis moves on its first gradient (one with bases has taken
            # its estimates from it in _accumulate_factors and reaches here from the second).
            self._initial_estimates_(group, state, grad, stack, ok)
        beta1 = group["betas"][0]
        exp_avg = state["exp_avg"] if stack is None else state["exp_avg"].view(stack)
        if ok is None and exp_avg.dtype == grad.dtype:
            exp_avg.lerp_(grad, 1.0 - beta1)
            m = exp_avg
        else:  # out of place, kept where ok; bf16 state (state_dtype) widened, rounded once
            m = exp_avg.to(widest(exp_avg, grad)).lerp(grad, 1.0 - beta1)
            commit_(exp_avg, m, ok)
        _x, batch, keys = self._working_view(state, grad, stack)
        if stack is None and grad.dim() == 0:
            m, bases = m.reshape(1), [None]
        m_hat = m / bias_correction(beta1, step)  # out of place: m may be the state itself
        denominator = kronecker_root([state[f"{key}.eigenvalues"] for key in keys], batch)
        rotated = project(m_hat, bases) / denominator.add_(group["eps"])
        return project_back(rotated, bases)


kl_shampoo = routed_factory(
    KLShampoo,
    "kl_shampoo",
    """A :class:`KLShampoo` for a model (routed: :func:`guided_descent.routing.route`) or
    parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights go to KL-Shampoo and embeddings,
    the output head, norms and biases to AdamW (``routing``, ``routing_policy`` and
    ``example_inputs`` as :func:`~guided_descent.optimizers.soap.soap`'s); given parameters, they
    are split by shape. The other arguments are :class:`KLShampoo`'s.
    """,
)

kl_soap = routed_factory(
    KLSOAP,
    "kl_soap",
    """A :class:`KLSOAP` for a model (routed: :func:`guided_descent.routing.route`) or
    parameters; routing and arguments as :func:`kl_shampoo`'s, the rest :class:`KLSOAP`'s.
    """,
)

_REFERENCE = "Lin et al. 2025, arXiv 2509.03378 (code: yorkerlin/KL-Methods)"

KL_SHAMPOO_SPEC = register(
    OptimizerSpec(
        name="kl_shampoo",
        family="layer-wise",
        rule="M preconditioned by (L ⊗ R)^-1/2, L = E[G R^-1 Gᵀ]/n, R = E[Gᵀ L^-1 G]/m "
        "(eigenvalues estimated per step in a QR-refreshed eigenbasis), no grafting",
        state="1x (first moment) + per dimension an n×n factor and basis and n eigenvalues",
        state_buffers=1.0,
        reference=_REFERENCE,
        factory=kl_shampoo,
        defaults=dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
        routes=True,
    )
)

KL_SOAP_SPEC = register(
    OptimizerSpec(
        name="kl_soap",
        family="layer-wise",
        rule="SOAP (Adam in the factors' eigenbasis) with KL-estimated factors "
        "L = E[G R^-1 Gᵀ]/n, R = E[Gᵀ L^-1 G]/m",
        state="2x (first and second moment, both rotated) + per dimension an n×n factor and "
        "basis and n eigenvalues",
        state_buffers=2.0,
        reference=_REFERENCE,
        factory=kl_soap,
        defaults=dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01),
        routes=True,
    )
)
set_policy(KLShampoo.ALGORITHM, KLShampoo.ROUTING)
set_policy(KLSOAP.ALGORITHM, KLSOAP.ROUTING)
