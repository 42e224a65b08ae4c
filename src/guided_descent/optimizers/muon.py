"""Muon: momentum orthogonalized by Newton–Schulz, for hidden matrices; AdamW for the rest.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon). The update rule lives in
:mod:`guided_descent.preconditioners.orthogonalize`; this module is the ``torch.optim`` shell and
the registry entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from guided_descent.distributed.dtensor import local, shard_layout
from guided_descent.distributed.plan import assign, newton_schulz_flops
from guided_descent.distributed.split import Distributed, TensorSpec, auto
from guided_descent.linalg.newton_schulz import (
    JORDAN,
    Coefficients,
    coefficient_schedule,
    default_compute_dtype,
)
from guided_descent.optimizers.hybrid import HybridOptimizer, adamw_defaults, plan_groups
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.orthogonalize import (
    AdjustLR,
    MatrixView,
    matrix_shape,
    momentum_direction,
    muon_update,
    orthogonalize,
    shape_scale,
)
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.descend import step_rms

DEFAULT_LR = 0.02
DEFAULT_MOMENTUM = 0.95
DEFAULT_ADAMW_LR = 3e-4
DEFAULT_ADAMW_BETAS = (0.9, 0.95)


def _normalized_coefficients(
    value: Coefficients | Sequence[Coefficients], steps: int
) -> Coefficients | tuple[Coefficients, ...]:
    """Validate against ``steps`` and return plain float tuples (what ``state_dict`` saves)."""
    schedule = coefficient_schedule(value, steps)
    if len(value) == 3 and not isinstance(value[0], Sequence):
        return schedule[0]
    return schedule


def _check_muon_options(owner: str, group: Mapping[str, Any]) -> None:
    """Each key by ``validation.CHECKS``, then the coefficient schedule against ``ns_steps``."""
    validate_hyperparams(owner, group)
    if "ns_steps" in group and "ns_coefficients" in group:
        try:
            coefficient_schedule(group["ns_coefficients"], group["ns_steps"])
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None


class Muon(HybridOptimizer):
    """Muon (MomentUm Orthogonalized by Newton–Schulz), Jordan et al. 2024, with AdamW alongside.

    Update, per matrix ``W`` (m x n) of a ``"muon"`` group, gradient ``g``, buffer ``M``::

        M = mu * M + (1 - mu) * g
        D = (1 - mu) * g + mu * M   (nesterov)   or   M
        W = W * (1 - lr * weight_decay)
        W = W - lr * scale(m, n) * NS(D)           # NS(D) ≈ U Vᵀ for D = U Σ Vᵀ

    ``NS`` is ``ns_steps`` quintic Newton–Schulz iterations
    (:func:`guided_descent.linalg.newton_schulz.newton_schulz`); ``scale`` is set by ``adjust_lr``.
    Groups tagged ``algorithm="adamw"`` (embeddings, output head, norms, biases: see
    :mod:`guided_descent.routing`) are stepped by ``torch.optim``'s AdamW with their own ``lr``,
    ``betas``, ``eps`` and ``weight_decay``. Groups without a tag are split by dimension
    (>= 2-D to Muon).

    Args:
        params: parameters or param-group dicts (optionally tagged ``"algorithm"``).
        lr: Muon's learning rate. Default 0.02, right for ``adjust_lr="original"``; with
            ``"match_rms_adamw"`` use an AdamW learning rate.
        momentum: ``mu``, the EMA coefficient of the buffer, in [0, 1). Default 0.95.
        nesterov: orthogonalize the look-ahead ``D`` rather than ``M``. Default True.
        ns_steps: Newton–Schulz iterations. Default 5.
        ns_coefficients: one ``(a, b, c)`` triple for every iteration (default
            :data:`~guided_descent.linalg.newton_schulz.JORDAN`) or one triple per iteration
            (e.g. :data:`~guided_descent.linalg.newton_schulz.POLAR_EXPRESS`).
        weight_decay: decoupled weight decay, multiplied by ``lr`` (not by the shape scale).
            Default 0.
        adjust_lr: ``"original"``, ``scale = sqrt(max(1, m/n))`` (default), or
            ``"match_rms_adamw"``, ``scale = 0.2 * sqrt(max(m, n))`` (Liu et al. 2025,
            arXiv 2502.16982) so that AdamW's ``lr`` and ``weight_decay`` carry over.
        matrix_view: how a 3-D+ parameter is seen as matrices: ``"flatten"`` (default; a
            convolution kernel ``(out, in, *k)`` is one ``(out, in·prod(k))`` matrix) or
            ``"batch"`` (``(..., m, n)`` is a stack of matrices, each orthogonalized alone). Set it
            per param group when a model has both kinds.
        ns_dtype: Newton–Schulz compute dtype; ``None``: bfloat16 on CUDA, float32 elsewhere.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups
            (3e-4, (0.9, 0.95), 1e-8, 0).
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        distributed: split the Newton–Schulz work between data-parallel replicas: every
            matrix is orthogonalized by one rank (balanced by FLOPs) and the results are
            all-gathered. ``None`` (default): only when :func:`muon` is given a DDP module;
            ``True``, a process group or a :class:`~guided_descent.distributed.WorkSplit`:
            always; ``False``: never (see :func:`guided_descent.distributed.resolve`).
            FSDP2-sharded (DTensor) matrices are always assembled on one owner rank,
            orthogonalized there and sent back in shards; the momentum stays sharded.

    State per Muon parameter: ``momentum_buffer`` (its shape and dtype). AdamW parameters:
    ``step``, ``exp_avg``, ``exp_avg_sq`` as in ``torch.optim.AdamW``. Newton–Schulz needs no
    fallback: on a finite input it is a fixed polynomial of a matrix normalized to norm <= 1, so
    its output is finite (the guard keeps non-finite gradients out); there is no stored
    preconditioner to age.
    """

    ALGORITHM = "muon"
    # What this method takes from a model (guided_descent.routing): hidden matrices only.
    ROUTING = RoutingPolicy()
    MASKED_SKIP = True  # takes a device-side flag: see guard's "Sync-free skip"
    STATE_NAME = "Muon"

    def __init__(
        self,
        params: Any,
        lr: float = DEFAULT_LR,
        momentum: float = DEFAULT_MOMENTUM,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: Coefficients | Sequence[Coefficients] = JORDAN,
        weight_decay: float = 0.0,
        adjust_lr: AdjustLR = "original",
        matrix_view: MatrixView = "flatten",
        ns_dtype: torch.dtype | None = None,
        *,
        adamw_lr: float = DEFAULT_ADAMW_LR,
        adamw_betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        on_nonfinite: str = "skip",
        distributed: Distributed = None,
        router: Router | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            weight_decay=weight_decay,
            adjust_lr=adjust_lr,
            matrix_view=matrix_view,
            ns_dtype=ns_dtype,
        )
        _check_muon_options("muon", defaults)
        defaults["ns_coefficients"] = _normalized_coefficients(ns_coefficients, ns_steps)
        adamw = adamw_defaults(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        super().__init__(params, defaults, adamw, on_nonfinite, distributed, router)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check before torch appends the group; a group's keys fall back to the defaults, so a
        # group that overrides only ns_steps is checked against the default coefficients.
        merged = {**self.defaults, **param_group}
        _check_muon_options(f"muon (param group {len(self.param_groups)})", merged)
        if "ns_coefficients" in param_group or "ns_steps" in param_group:
            coefficients = _normalized_coefficients(merged["ns_coefficients"], merged["ns_steps"])
            param_group = {**param_group, "ns_coefficients": coefficients}
        super().add_param_group(param_group)

    def matrix_step(self, group: dict[str, Any], ok: Tensor | None = None) -> None:
        params, grads, buffers = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            buffers.append(state["momentum_buffer"])
        if not params:
            return
        sharded = [shard_layout(p) is not None for p in params]
        if any(sharded):
            self._sharded_step(
                group,
                [x for x, s in zip(params, sharded, strict=True) if s],
                [x for x, s in zip(grads, sharded, strict=True) if s],
                [x for x, s in zip(buffers, sharded, strict=True) if s],
            )
            params, grads, buffers = (
                [x for x, s in zip(xs, sharded, strict=True) if not s]
                for xs in (params, grads, buffers)
            )
            if not params:
                return
        orthogonalizer = None
        if self.work_split is not None:
            orthogonalizer = partial(self._split_orthogonalize, group)
        updates_rms = muon_update(
            params,
            grads,
            buffers,
            lr=float(group["lr"]),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            adjust_lr=group["adjust_lr"],
            matrix_view=group["matrix_view"],
            ns_steps=group["ns_steps"],
            ns_coefficients=group["ns_coefficients"],
            ns_dtype=group["ns_dtype"],
            orthogonalizer=orthogonalizer,
            ok=ok,
        )
        for p, value in zip(params, updates_rms, strict=True):
            self._observe(p, update_rms=value)

    def _orthogonalize(self, group: Mapping[str, Any], directions: list[Tensor]) -> list[Tensor]:
        return orthogonalize(
            directions,
            group["matrix_view"],
            steps=group["ns_steps"],
            coefficients=group["ns_coefficients"],
            dtype=group["ns_dtype"],
        )

    def _cost(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> float:
        count, m, n = matrix_shape(shape, group["matrix_view"])
        return count * newton_schulz_flops(m, n, group["ns_steps"])

    def _compute_dtype(self, group: Mapping[str, Any], device: torch.device) -> torch.dtype:
        dtype = group["ns_dtype"]
        return default_compute_dtype(device) if dtype is None else dtype

    def _split_orthogonalize(
        self, group: Mapping[str, Any], directions: list[Tensor]
    ) -> list[Tensor]:
        """Replicated directions (DDP): each rank orthogonalizes its share, all-gather the rest."""
        split = self.work_split
        assert split is not None
        specs = [
            [TensorSpec(tuple(d.shape), self._compute_dtype(group, d.device), d.device)]
            for d in directions
        ]

        def compute(indices: list[int]) -> list[list[Tensor]]:
            return [[o] for o in self._orthogonalize(group, [directions[i] for i in indices])]

        costs = [self._cost(group, tuple(d.shape)) for d in directions]
        # The results are used at once: views of the receive buffer, no copies.
        shared = split.map("newton_schulz", costs, specs, compute, own_storage=False)
        return [payload[0] for payload in shared]

    def _sharded_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor],
    ) -> None:
        """FSDP2: momentum on the local shards; each matrix is gathered on its owner rank,
        orthogonalized there, and every rank gets its shard of the result back."""
        split = self.sharded_split()
        lr = float(group["lr"])
        view = group["matrix_view"]
        directions = [
            momentum_direction(local(g), local(b), group["momentum"], group["nesterov"])
            for g, b in zip(grads, buffers, strict=True)
        ]
        shapes = [tuple(p.shape) for p in params]
        sizes = [
            lr * shape_scale(*matrix_shape(shape, view)[1:], group["adjust_lr"]) for shape in shapes
        ]
        costs = [self._cost(group, shape) for shape in shapes]
        dtypes = [self._compute_dtype(group, p.device) for p in params]

        def compute(indices: list[int], full: list[Tensor]) -> list[tuple[Tensor, list[Tensor]]]:
            orth = self._orthogonalize(group, full)
            # The step's RMS over the whole matrix travels with the shards, for diagnostics.
            return [
                (o, [step_rms(o, sizes[i]).to(o.dtype)]) for i, o in zip(indices, orth, strict=True)
            ]

        shards, extras = split.map_sharded(
            "newton_schulz",
            assign(costs, split.world_size).owners,
            costs,
            directions,
            [shard_layout(p) for p in params],  # type: ignore[misc]  # sharded, not None
            compute,
            out_dtypes=dtypes,
            extra_specs=[
                [TensorSpec((), dt, p.device)] for dt, p in zip(dtypes, params, strict=True)
            ],
        )
        weight_decay = group["weight_decay"]
        for p, o, size, extra in zip(params, shards, sizes, extras, strict=True):
            target = local(p)
            if weight_decay != 0.0:
                target.mul_(1.0 - lr * weight_decay)
            target.add_(o, alpha=-size)  # as muon_update: one rounding into p's dtype
            self._observe(p, update_rms=extra[0])

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        return ("momentum_buffer",), {"momentum_buffer": tuple(p.shape)}

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        return {"preconditioner": "newton-schulz"}


def muon(
    target: nn.Module | Iterable[Any],
    *,
    lr: float = DEFAULT_LR,
    momentum: float = DEFAULT_MOMENTUM,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Coefficients | Sequence[Coefficients] = JORDAN,
    weight_decay: float = 0.0,
    adjust_lr: AdjustLR = "original",
    matrix_view: MatrixView = "flatten",
    ns_dtype: torch.dtype | None = None,
    adamw_lr: float = DEFAULT_ADAMW_LR,
    adamw_betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    routing: Mapping[str, str] | None = None,
    routing_policy: RoutingPolicy | None = None,
    example_inputs: Any = None,
    on_nonfinite: str = "skip",
    distributed: Distributed = None,
) -> Muon:
    """A :class:`Muon` for a model (routed: :func:`guided_descent.routing.route`) or parameters.

    Given an ``nn.Module``, hidden ``Linear``/``Conv`` weights go to Muon and everything else to
    AdamW; ``routing`` maps ``fnmatch`` patterns on parameter names to ``"muon"`` or ``"adamw"``
    to override that. Given a list of parameters, >= 2-D ones go to Muon; param-group dicts are
    passed through. The other arguments are :class:`Muon`'s (``distributed=None`` splits the
    work when ``target`` is a ``DistributedDataParallel`` module).
    ``routing_policy`` replaces the method's :class:`~guided_descent.routing.RoutingPolicy`
    (what it takes from a model: head, input layer, embeddings, vectors, attention views);
    ``example_inputs`` (the arguments of one forward pass) settle the routing at once instead of
    at the model's first forward pass.
    """
    groups, router = plan_groups(
        target, Muon.ALGORITHM, routing, policy=routing_policy, example_inputs=example_inputs
    )
    return Muon(
        groups,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_coefficients=ns_coefficients,
        weight_decay=weight_decay,
        adjust_lr=adjust_lr,
        matrix_view=matrix_view,
        ns_dtype=ns_dtype,
        adamw_lr=adamw_lr,
        adamw_betas=adamw_betas,
        adamw_eps=adamw_eps,
        adamw_weight_decay=adamw_weight_decay,
        on_nonfinite=on_nonfinite,
        distributed=auto(distributed, target),
        router=router,
    )


SPEC = register(
    OptimizerSpec(
        name="muon",
        family="layer-wise",
        rule="M = EMA(g); p -= lr * scale(m,n) * NS(g + mu*(M - g)), NS(UΣVᵀ) ≈ UVᵀ",
        state="1x (momentum) + AdamW 2x for routed-out params",
        state_buffers=1.0,
        reference="Jordan et al. 2024 (kellerjordan.github.io/posts/muon)",
        factory=muon,
        defaults=dict(
            lr=DEFAULT_LR,
            momentum=DEFAULT_MOMENTUM,
            adamw_lr=DEFAULT_ADAMW_LR,
            adamw_betas=DEFAULT_ADAMW_BETAS,
        ),
        routes=True,
    )
)
set_policy(Muon.ALGORITHM, Muon.ROUTING)
