"""PSGD Kron: SGD with momentum, preconditioned by Kronecker factors fitted to whiten gradients.

Li 2015, "Preconditioned stochastic gradient descent", arXiv 1512.04202 (Kronecker form: Li's
``psgd_torch``; Walters' ``kron`` / ``kron-torch``, pytorch_optimizer's ``Kron``, heavyball's
``PSGDKron``). The preconditioner's math lives in :mod:`guided_descent.preconditioners.psgd`;
this module is the ``torch.optim`` shell and the registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from guided_descent.distributed.split import Distributed, WorkSplit
from guided_descent.optimizers.diagnostics import rms
from guided_descent.optimizers.hybrid import adamw_defaults, routed_factory
from guided_descent.optimizers.kronecker import KroneckerOptimizer
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.kronecker import compute_dtype, factor_name
from guided_descent.preconditioners.psgd import (
    MEMORY_SAVE_MODES,
    UpdateSchedule,
    balance_,
    clip_rms_,
    dense_dims,
    fit_due,
    initial_factors,
    initial_scale_,
    precondition,
    probe,
    probe_key,
    update_factors_,
)
from guided_descent.preconditioners.views import FLATTEN, matrix_shape, parse_view
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.masking import bias_correction, commit_, count_

PREFIX = "psgd"
ALGORITHM = "psgd_kron"
MOMENTUM = f"{PREFIX}.momentum"
FITS = f"{PREFIX}.fits"
SEED = 0x5EED


def _stored_probability(value: Any) -> Any:
    """A schedule as the mapping of its fields: param groups keep plain values, so that a state
    dict loads with ``torch.load(weights_only=True)``."""
    return asdict(value) if isinstance(value, UpdateSchedule) else value


def _check_psgd_options(owner: str, group: Mapping[str, Any]) -> None:
    """PSGD's own keys (the shared ones -- lr, momentum, weight_decay, matrix_view -- are checked
    by ``validation.CHECKS``)."""
    prob = group.get("preconditioner_update_probability")
    if isinstance(prob, Mapping):
        try:
            prob = UpdateSchedule(**prob)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{owner}: preconditioner_update_probability: {err}") from None
    if not isinstance(prob, UpdateSchedule) and (
        isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0
    ):
        raise ValueError(
            f"{owner}: preconditioner_update_probability must be a number in [0, 1] or an "
            f"UpdateSchedule, got {prob!r}"
        )
    for key in ("precondition_lr", "precondition_init_scale"):
        value = group.get(key)
        if value is None and key == "precondition_init_scale":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{owner}: {key} must be a number > 0, got {value!r}")
    if not 0 < group.get("precondition_lr", 1.0) < 2:
        # The fit multiplies Q by (I - lr·E) with ‖E‖ <= 1-ish: lr >= 2 can flip its sign.
        raise ValueError(
            f"{owner}: precondition_lr must be in (0, 2), got {group['precondition_lr']!r}"
        )
    for key in ("max_size_triangular", "min_ndim_triangular"):
        value = group.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}: {key} must be an integer >= 0, got {value!r}")
    mode = group.get("memory_save_mode")
    if mode is not None and mode not in MEMORY_SAVE_MODES:
        raise ValueError(
            f"{owner}: memory_save_mode must be None or one of {MEMORY_SAVE_MODES}, got {mode!r}"
        )
    clip = group.get("update_clip_rms")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
    ):
        raise ValueError(f"{owner}: update_clip_rms must be None or a number > 0, got {clip!r}")
    if not isinstance(group.get("momentum_into_precondition_update"), bool):
        raise ValueError(
            f"{owner}: momentum_into_precondition_update must be a bool, got "
            f"{group.get('momentum_into_precondition_update')!r}"
        )
    seed = group.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner}: seed must be an integer >= 0, got {seed!r}")


class PSGDKron(KroneckerOptimizer):
    """PSGD Kron (Li 2015, arXiv 1512.04202) with AdamW for groups tagged ``"adamw"``.

    Update of a parameter ``W`` of a ``"psgd_kron"`` group at step ``t``, gradient ``G``, all in
    float32 (float64 for float64 parameters); ``Q_i`` one factor per dimension (upper triangular,
    or diagonal: see ``max_size_triangular``, ``memory_save_mode``), ``Q = ⊗ Q_i``::

        m = beta m + (1 - beta) G;   M = m / (1 - beta^t)                  momentum
        at t = 1 (precondition_init_scale None):  Q_i ← (mean M⁴)^(-1/8k) Q_i   (M: or G)
        if the schedule fits at t:  V = probe(seed, parameter, t) ~ N(0, I)
            rebalance the Q_i (powers of two, Q unchanged), then fit every Q_i on (M, V):
            Q_i ← Q_i - precondition_lr · triu(A_(i)A_(i)ᵀ - B_(i)B_(i)ᵀ) / ‖...+...‖ · Q_i,
            A = M ×_j Q_j,  B = V ×_j Q_j⁻ᵀ        (Q_jᵀQ_j → E[M Mᵀ]^(-1/2) along dim j)
        U = M ×_i (Q_iᵀ Q_i);   U = U · min(1, update_clip_rms / (rms(U) + 1e-6))
        W = W (1 - lr weight_decay) - lr U

    This is pytorch_optimizer's ``Kron`` (= Walters' ``kron-torch``) step by step: with its
    initial scale 1, the same probes and the same schedule, the two agree to rounding
    (``tests/test_psgd.py``: 2e-15 of the displacement in float64).
    What differs, and why:

    * **Probes** come from a counter-based hash of ``(seed, group, position, step)``
      (:func:`~guided_descent.preconditioners.psgd.probe`), not from torch's global generator:
      the same on every replica, after a resume, for a skipped step and under
      ``torch.compile(fullgraph=True)`` (a ``torch.Generator`` cannot be traced), with nothing to
      save. Runs differ from the references' in the draws, not in their distribution.
    * **Schedule**: the references' probability (1 for 500 steps, ``exp(-0.001 (n - 500))``
      down to 0.03), spent deterministically when its running sum crosses an integer (heavyball's
      rule; kron-torch draws ``rand() < p``, pytorch_optimizer fits every ``ceil(1/p)`` steps).
    * **Balancing** of the factors' norms at every fit by powers of two (exact), instead of by
      the geometric mean with probability 0.01 (it changes the factors, never ``Q``).
    * **Clipping**: kron-torch's and pytorch_optimizer's RMS clip at 1.1, in float32 before the
      parameter's dtype (they clip after casting); heavyball's default elementwise
      ``tanh``/``log1p`` "trust region" clip and its other refinements (lower-bound EMA,
      dampening, several power iterations for the norm) are not included.
    * **Weight decay** is decoupled and applies to every parameter of the group (the references
      skip vectors; here vectors go to AdamW unless a group is tagged ``"psgd_kron"``).
    * **Initial scale**: ``None`` (Li's heuristic from the first gradient, heavyball's default
      too, though heavyball takes a further square root), where pytorch_optimizer starts at 1.
    * **Vectors and scalars** of a tagged group take the diagonal path (every factor diagonal),
      as in the references.

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``). Untagged
            groups are split by shape: >= 2-D to PSGD, the rest to AdamW. Use :func:`psgd_kron`
            on a model to route embeddings, the head, norms and biases to AdamW.
        lr: learning rate. Default 1e-3 (pytorch_optimizer's and heavyball's; kron-torch 3e-4).
        momentum: EMA coefficient ``beta`` of the gradient (bias-corrected). Default 0.9.
        weight_decay: decoupled weight decay, multiplied by ``lr``. Default 0.
        preconditioner_update_probability: a constant in [0, 1] or an
            :class:`~guided_descent.preconditioners.psgd.UpdateSchedule` (default: the
            references' schedule, spent deterministically). A param group keeps a schedule as
            the dict of its fields (plain values: ``torch.load(weights_only=True)`` reads it).
        precondition_lr: step size of the fit on the Lie group, in (0, 2). Default 0.1.
        precondition_init_scale: the initial ``Q = scale · I`` (each factor ``scale^(1/k) I``).
            ``None`` (default): Li's ``psgd_torch`` heuristic ``scale = (mean M⁴)^(-1/8)`` from
            the first step's ``M``, so that the first updates have about unit entries (1 where
            ``M`` is zero); pytorch_optimizer's ``Kron`` uses 1. Measured on the model-zoo
            models (loss after 60 steps / first loss): 0.36-0.97 with ``None``, 0.45-0.99
            with 1.
        max_size_triangular: dimensions longer than this get a diagonal factor. Default 8192.
        min_ndim_triangular: tensors with fewer dimensions get diagonal factors only. Default 2.
        memory_save_mode: ``None`` (default), ``"one_diag"`` (the longest dimension diagonal),
            ``"smart_one_diag"`` (only if strictly the longest) or ``"all_diag"``.
        momentum_into_precondition_update: fit on the momentum ``M`` (default, as the
            references) or on the raw gradient.
        update_clip_rms: the RMS the update is clipped to; ``None`` turns the clip off.
            Default 1.1 (kron's).
        seed: the probes' seed. Default a fixed constant: two runs draw the same probes.
        matrix_view: ``"flatten"`` (default) fits one factor per dimension of the tensor as it
            is; ``"batch"`` and ``"split:K"`` fit two per matrix of the view, each matrix its own
            (routing sets these for attention, recurrent and expert weights).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: hyper-parameters of the AdamW
            groups; ``None`` (default): ``lr``, (0.9, 0.999), 1e-8, ``weight_decay``.
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        distributed: accepted like Shampoo's; PSGD's fit is cheap (no decompositions), so every
            replica fits every factor itself (identical, the probes being deterministic) and no
            work is split. FSDP2-sharded parameters are handled by one owner rank each.

    State per PSGD parameter (float32, or float64): ``step``; ``psgd.momentum`` (``m``); per
    dimension ``psgd.L``/``psgd.R`` (matrices) or ``psgd.dim{i}``: ``(n, n)`` upper triangular
    or ``(n,)`` diagonal, with a leading ``count`` for ``"batch"``/``"split:K"`` views (a 0-d
    parameter keeps one ``(1,)`` factor); ``psgd.fits``: fits done.
    """

    ALGORITHM = ALGORITHM
    # What this method takes from a model (guided_descent.routing): hidden matrices only.
    ROUTING = RoutingPolicy()
    STATE_NAME = "PSGD"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        preconditioner_update_probability: float | UpdateSchedule = UpdateSchedule(),  # noqa: B008
        precondition_lr: float = 0.1,
        precondition_init_scale: float | None = None,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precondition_update: bool = True,
        update_clip_rms: float | None = 1.1,
        seed: int = SEED,
        matrix_view: str = "flatten",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] | None = None,
        adamw_eps: float | None = None,
        adamw_weight_decay: float | None = None,
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
        router: Router | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            preconditioner_update_probability=_stored_probability(
                preconditioner_update_probability
            ),
            precondition_lr=precondition_lr,
            precondition_init_scale=precondition_init_scale,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            momentum_into_precondition_update=momentum_into_precondition_update,
            update_clip_rms=update_clip_rms,
            seed=seed,
            matrix_view=matrix_view,
        )
        validate_hyperparams(PREFIX, defaults)
        _check_psgd_options(PREFIX, defaults)
        inherit = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
        adamw = adamw_defaults(
            adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, inherit=inherit
        )
        super().__init__(params, defaults, adamw, on_nonfinite, distributed, router)

    def check_group(self, owner: str, group: Mapping[str, Any]) -> None:
        _check_psgd_options(owner, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        key = "preconditioner_update_probability"
        if isinstance(param_group.get(key), UpdateSchedule):
            param_group = {**param_group, key: _stored_probability(param_group[key])}
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------ layout

    @staticmethod
    def _matrices(p: Tensor, group: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """``(count, m, n)`` when the group's view makes ``p`` a stack of matrices, each with
        factors of its own; ``None`` for the tensor path."""
        view = group.get("matrix_view", FLATTEN)
        if p.dim() < 2 or parse_view(view)[0] == FLATTEN:
            return None
        return matrix_shape(p.shape, view)

    def _layout(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[int, ...], list[str], tuple[bool, ...], int | None]:
        """``(shape, factor keys, dense per dimension, count)``: ``p`` as the batch of tensors
        the factors act on (``count`` ``None``: one tensor, factors without a batch dimension)."""
        stack = self._matrices(p, group)
        if stack is None:
            shape = tuple(p.shape) if p.dim() else (1,)
            count = None
        else:
            shape, count = stack[1:], stack[0]
        dense = dense_dims(
            shape,
            group["max_size_triangular"],
            group["min_ndim_triangular"],
            group["memory_save_mode"],
        )
        keys = [f"{PREFIX}.{factor_name(d, len(shape))}" for d in range(len(shape))]
        return shape, keys, dense, count

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        shape, keys, dense, count = self._layout(p, group)
        lead = () if count is None else (count,)
        shapes: dict[str, tuple[int, ...]] = {MOMENTUM: tuple(p.shape)}
        for key, n, full in zip(keys, shape, dense, strict=True):
            shapes[key] = (*lead, n, n) if full else (*lead, n)
        return ("step", MOMENTUM, FITS, *keys), shapes

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state.get(p)
        if not state:
            return {}
        return {"preconditioner": "kronecker", "fits": int(state[FITS])}

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        state = self.state[p]
        dtype = compute_dtype(p.dtype)
        shape, keys, dense, count = self._layout(p, group)
        # On the parameter's device, so that a sync-free step updates it there.
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
        state[MOMENTUM] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state[FITS] = torch.zeros((), dtype=torch.int64, device=p.device)
        state["calls"] = 0  # steps attempted, counted on the host (the fit schedule)
        factors = initial_factors(
            shape, dense, group["precondition_init_scale"] or 1.0, dtype, p.device, count
        )
        for key, q in zip(keys, factors, strict=True):
            state[key] = q

    def restore_counts(self, p: Tensor, group: Mapping[str, Any], state: dict[str, Any]) -> None:
        state["calls"] = int(state["step"].item())

    def _stream(self, group: Mapping[str, Any]) -> tuple[int, dict[int, int]]:
        """The group's index and each parameter's position in it: with the seed, they name a
        parameter's probe stream the same way on every rank and after a resume."""
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        return index, {id(p): j for j, p in enumerate(group["params"])}

    # ------------------------------------------------------------------------------ step

    def updates(
        self,
        group: dict[str, Any],
        items: list[tuple[Tensor, Tensor]],
        split: WorkSplit | None,
        consume: Callable[[int, Tensor], None],
        ok: Tensor | None = None,
    ) -> None:
        """Advance the state of every ``(parameter, full gradient)`` and hand its update ``U``
        to ``consume(index, U)``. ``split`` is not used (see ``distributed``).

        A sync-free step reads nothing on the host: the fit schedule follows ``state["calls"]``
        (host int: steps attempted), the bias correction and the probes the ``step`` tensor, and
        with ``ok`` every state tensor changes only where it is true."""
        del split
        sync_free = self._sync_free_step
        beta = group["momentum"]
        lr = float(group["lr"])
        index, positions = self._stream(group)
        for i, (p, raw_grad) in enumerate(items):
            state = self.state[p]
            if not state:
                self.init_matrix_state(p, group)
            shape, keys, _dense, count = self._layout(p, group)
            count_(state["step"], ok)
            state["calls"] += 1
            # The schedule's step: the host's count when the step is sync-free, else the exact one.
            t = state["calls"] if sync_free else int(state["step"].item())
            grad = raw_grad.to(compute_dtype(p.dtype))  # p.grad itself is never written
            m = state[MOMENTUM]
            # beta·m + (1 - beta)·G in the references' order of operations (not lerp).
            new_m = m.mul(beta).add_(grad, alpha=1.0 - beta)
            commit_(m, new_m, ok)
            taken = state["step"] if sync_free else t
            # The bias-corrected momentum, as (B, d_1, ..., d_k) for the factors.
            batched = (1, *shape) if count is None else (count, *shape)
            m_hat = (new_m / bias_correction(beta, taken)).reshape(batched)
            factors = [state[k] if count is not None else state[k].unsqueeze(0) for k in keys]
            if group["momentum_into_precondition_update"]:
                target = m_hat
            else:
                target = grad.reshape(batched)
            if group["precondition_init_scale"] is None and state["calls"] == 1:
                initial_scale_(factors, target, ok)
            if fit_due(group["preconditioner_update_probability"], t):
                key = probe_key(group["seed"], index, positions[id(p)])
                # The probe is keyed by the step tensor: a skipped sync-free step does not move
                # the stream, so the next step draws what a host-decided run draws.
                v = probe(batched, key, state["step"], m_hat.dtype, m_hat.device)
                balance_(factors, ok)
                update_factors_(factors, target, v, group["precondition_lr"], ok)
                count_(state[FITS], ok)
            update = clip_rms_(precondition(m_hat, factors), group["update_clip_rms"])
            update = update.reshape(p.shape)
            self._observe(p, update_rms=rms(update, lr))
            consume(i, update)

    def cost(self, p: Tensor, group: Mapping[str, Any]) -> float:
        """Estimated FLOPs per step: per dense dimension of length ``n`` about ``10 numel n``
        (the fit's two products, the triangular solve and two Gram matrices; the two products
        of the preconditioning) and ``n³`` for the factor's multiplicative update."""
        shape, _keys, dense, count = self._layout(p, group)
        cost = 4.0 * p.numel()
        for n, full in zip(shape, dense, strict=True):
            if full:
                cost += 10.0 * p.numel() * n + (count or 1) * float(n) ** 3
        return cost


psgd_kron = routed_factory(
    PSGDKron,
    ALGORITHM,
    """A :class:`PSGDKron` for a model (routed: :func:`guided_descent.routing.route`) or
    parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights go to PSGD and embeddings, the
    output head, norms and biases to AdamW (``routing`` overrides by ``fnmatch`` pattern,
    ``routing_policy`` changes what PSGD takes, ``example_inputs`` settle the routing at once
    rather than at the first forward pass); given parameters, they are split by shape. The
    other arguments are :class:`PSGDKron`'s.
    """,
)


SPEC = register(
    OptimizerSpec(
        name=ALGORITHM,
        family="layer-wise",
        rule="p -= lr * clip(M ×_i Q_iᵀQ_i), Q_i fitted on the Lie group to whiten M "
        "(QᵀQ → E[MMᵀ]^-1/2)",
        state="1x momentum + per dimension an n×n triangular factor (diagonal when large)",
        state_buffers=1.0,
        reference="Li 2015, arXiv 1512.04202",
        factory=psgd_kron,
        defaults=dict(lr=1e-3, momentum=0.9),
        routes=True,
    )
)
set_policy(PSGDKron.ALGORITHM, PSGDKron.ROUTING)
