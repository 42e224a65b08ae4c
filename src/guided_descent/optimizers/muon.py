"""Muon: momentum orthogonalized by Newton–Schulz, for hidden matrices; AdamW for the rest.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(kellerjordan.github.io/posts/muon). The update rule lives in
:mod:`guided_descent.preconditioners.orthogonalize`; this module is the ``torch.optim`` shell and
the registry entries: ``muon``, and NorMuon and AdaMuon as ``normuon`` and ``adamuon`` -- the same
class with ``variant=`` set and their papers' defaults, not copies.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Final

import torch
from torch import Tensor, nn

from guided_descent.distributed.dtensor import local, shard_layout
from guided_descent.distributed.plan import assign, newton_schulz_flops
from guided_descent.distributed.split import Distributed, TensorSpec, auto
from guided_descent.linalg.newton_schulz import (
    JORDAN,
    Coefficients,
    coefficient_schedule,
    cpu_bf16_matmul,
    default_compute_dtype,
)
from guided_descent.optimizers.compiled import check_compile_update, kernel
from guided_descent.optimizers.hybrid import HybridOptimizer, adamw_defaults, plan_groups
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.optimizers.validation import validate_hyperparams
from guided_descent.preconditioners.orthogonalize import (
    AdjustLR,
    MatrixView,
    MuonVariant,
    matrix_shape,
    momentum_direction,
    muon_update,
    orthogonalize,
    second_moment_shape,
    shape_scale,
)
from guided_descent.routing import Router, RoutingPolicy, set_policy
from guided_descent.transforms.cautious import CAUTIOUS_OFF, with_group_keys
from guided_descent.transforms.descend import step_rms
from guided_descent.transforms.state_dtype import (
    STATE_DTYPE_DEFAULT,
    parse_state_dtype,
    state_zeros,
)

DEFAULT_LR = 0.02
DEFAULT_MOMENTUM = 0.95
DEFAULT_ADAMW_LR = 3e-4
DEFAULT_ADAMW_BETAS = (0.9, 0.95)
DEFAULT_BETA2 = 0.95  # NorMuon's beta2; AdaMuon's code uses the momentum, also 0.95
DEFAULT_EPS = 1e-8  # AdaMuon's; NorMuon's code uses 1e-10 (the normuon registry default)

# The state key of each variant's second moment (plain Muon has none).
SECOND_MOMENT: Final[dict[str, str]] = {
    "normuon": "normuon.row_sq",
    "adamuon": "adamuon.exp_avg_sq",
}
# What a Muon group saved before the variants and cautious flags existed means: plain Muon.
_LEGACY_GROUP: Final[dict[str, Any]] = dict(
    variant="muon", beta2=DEFAULT_BETA2, eps=DEFAULT_EPS, **CAUTIOUS_OFF
)


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
    ``variant="normuon"`` (Li et al. 2025, arXiv 2510.05491) divides each row of ``NS(D)`` by the
    root of an EMA of its mean square and restores the Frobenius norm; ``variant="adamuon"`` (Si
    et al. 2025, arXiv 2507.11005) orthogonalizes ``sign(D)``, divides element-wise by the root of
    an EMA of ``NS(·)²`` and rescales to the norm of an exact ``U Vᵀ``. The rules, their sources
    and where they differ from the authors' code are in
    :mod:`guided_descent.preconditioners.orthogonalize`; ``gd.create("normuon")`` and
    ``gd.create("adamuon")`` build this class with each paper's defaults.
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
        ns_dtype: Newton–Schulz compute dtype; ``None`` (default) chooses per matrix shape: bfloat16
            on CUDA, and on a CPU with bf16 matrix hardware (AMX / AVX512-BF16) for matrices large
            enough that it is faster (256x256 yes, 64x256 no), float32 otherwise
            (:func:`~guided_descent.linalg.newton_schulz.default_compute_dtype`). What was chosen
            is in ``diagnostics()`` (``ns_dtype`` per parameter, ``cpu_bf16_matmul``).
        variant: ``"muon"`` (default), ``"normuon"`` or ``"adamuon"`` (above). One choice, not
            flags: AdaMuon's element-wise moment subsumes NorMuon's per-row one, and neither paper
            combines them.
        beta2: EMA coefficient of the variants' second moment, in [0, 1). Default 0.95 (both
            papers). Unused by plain Muon.
        eps: added to the variants' denominators (and norms). Default 1e-8 (AdaMuon's; NorMuon's
            code uses 1e-10). Unused by plain Muon.
        cautious: zero the coordinates of the final update whose sign disagrees with the gradient
            and rescale the rest by the kept fraction (Liang et al. 2024, arXiv 2411.16085; see
            :mod:`guided_descent.transforms.cautious`). Default False.
        cautious_weight_decay: apply ``weight_decay`` only where the update and the parameter
            have the same sign (Chen et al. 2025, arXiv 2510.12402). Default False.
            Both cautious flags act on the Muon groups only: the AdamW groups run torch's
            AdamW kernel unchanged (a cautious AdamW would mean re-implementing it).
        compile_update: run the orthogonalization (:func:`~guided_descent.preconditioners.
            orthogonalize.orthogonalize`: views, normalization and Newton–Schulz) through
            ``torch.compile(fullgraph=True)`` on the local path; momentum, the variants and the
            step itself stay eager (:mod:`guided_descent.optimizers.compiled`). Default False
            (eager; measured in docs/benchmarks.md).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of the AdamW groups
            (3e-4, (0.9, 0.95), 1e-8, 0).
        on_nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` (default),
            ``"raise"`` or ``"off"`` (see :mod:`guided_descent.optimizers.guard`).
        state_dtype: the dtype ``momentum_buffer`` and AdaMuon's ``adamuon.exp_avg_sq`` are
            stored in: ``None`` (default) the parameter's; ``torch.bfloat16`` halves a float32
            model's state (``torch.float32`` or the names ``"bfloat16"``/``"float32"`` are
            accepted too). A step reads the buffers widened to float32, computes what the float32
            path computes and rounds into them once (:mod:`guided_descent.transforms.state_dtype`).
            NorMuon's per-row ``normuon.row_sq`` stays at least float32 (it is tiny), and the
            AdamW groups keep torch's AdamW state, in the parameter's dtype.
        distributed: split the Newton–Schulz work between data-parallel replicas: every
            matrix is orthogonalized by one rank (balanced by FLOPs) and the results are
            all-gathered. ``None`` (default): only when :func:`muon` is given a DDP module;
            ``True``, a process group or a :class:`~guided_descent.distributed.WorkSplit`:
            always; ``False``: never (see :func:`guided_descent.distributed.resolve`).
            FSDP2-sharded (DTensor) matrices are always assembled on one owner rank,
            orthogonalized there and sent back in shards; the momentum stays sharded.

    State per Muon parameter: ``momentum_buffer`` (its shape and dtype); NorMuon adds
    ``normuon.row_sq`` (one float32 entry per row of its matrices, ``(count·m, 1)``), AdaMuon
    ``adamuon.exp_avg_sq`` (its shape and dtype). Both are created with the momentum, saved in
    ``state_dict`` and committed by a sync-free step like it. Variants and cautious steps are
    not available for FSDP2-sharded parameters (a clear error says so). AdamW parameters:
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
        variant: MuonVariant = "muon",
        beta2: float = DEFAULT_BETA2,
        eps: float = DEFAULT_EPS,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        compile_update: bool = False,
        adamw_lr: float = DEFAULT_ADAMW_LR,
        adamw_betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        on_nonfinite: str = "skip",
        state_dtype: torch.dtype | str | None = None,
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
            variant=variant,
            beta2=beta2,
            eps=eps,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
        )
        _check_muon_options("muon", defaults)
        self.compile_update = check_compile_update("muon", compile_update)
        cpu_bf16_matmul()  # detected now, eagerly: a compiled step then reads a stored bool
        defaults["state_dtype"] = parse_state_dtype("muon", state_dtype)
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
        if "state_dtype" in param_group:  # checked with the rest above; stored as a dtype
            dtype = parse_state_dtype("muon", param_group["state_dtype"])
            param_group = {**param_group, "state_dtype": dtype}
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load (through the base classes' checks); a Muon group saved before
        ``variant``, ``beta2``, ``eps`` and the cautious flags existed loads as plain Muon."""
        state_dict = with_group_keys(state_dict, STATE_DTYPE_DEFAULT, self.ALGORITHM)
        super().load_state_dict(with_group_keys(state_dict, _LEGACY_GROUP, self.ALGORITHM))

    def matrix_step(self, group: dict[str, Any], ok: Tensor | None = None) -> None:
        variant = group["variant"]
        moment_key = SECOND_MOMENT.get(variant)
        params, grads, buffers, moments = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            state = self.state[p]
            if not state or (moment_key is not None and moment_key not in state):
                # Lazily on the host-decided path; a sync-free step has created it in
                # _init_group already (see HybridOptimizer._init_group).
                self._create_state(p, group)
            params.append(p)
            grads.append(p.grad)
            buffers.append(state["momentum_buffer"])
            if moment_key is not None:
                moments.append(state[moment_key])
        if not params:
            return
        sharded = [shard_layout(p) is not None for p in params]
        if any(sharded):
            chosen = [f"variant={variant!r}"] if variant != "muon" else []
            chosen += [k for k in ("cautious", "cautious_weight_decay") if group[k]]
            if chosen:
                raise NotImplementedError(
                    f"muon: {', '.join(chosen)} is not available for FSDP2-sharded (DTensor) "
                    "parameters yet (the second moments and the masks' kept fraction need the "
                    "whole matrix, which only its owner rank assembles). Use plain Muon without "
                    "the cautious flags for them, or DDP (replicated parameters)"
                )
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
        elif self.compile_update:  # Newton–Schulz compiled; the rest, lr included, eager
            orthogonalizer = partial(self._orthogonalize, group, compiled=True)
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
            variant=variant,
            second_moments=moments if moment_key is not None else None,
            beta2=group["beta2"],
            moment_eps=group["eps"],
            cautious=group["cautious"],
            cautious_weight_decay=group["cautious_weight_decay"],
        )
        for p, value in zip(params, updates_rms, strict=True):
            self._observe(p, update_rms=value)

    def _orthogonalize(
        self, group: Mapping[str, Any], directions: list[Tensor], compiled: bool = False
    ) -> list[Tensor]:
        return kernel(orthogonalize, compiled)(
            directions,
            group["matrix_view"],
            steps=group["ns_steps"],
            coefficients=group["ns_coefficients"],
            dtype=group["ns_dtype"],
        )

    def _cost(self, group: Mapping[str, Any], shape: tuple[int, ...]) -> float:
        count, m, n = matrix_shape(shape, group["matrix_view"])
        return count * newton_schulz_flops(m, n, group["ns_steps"])

    def _compute_dtype(
        self, group: Mapping[str, Any], device: torch.device, shape: tuple[int, ...]
    ) -> torch.dtype:
        """The Newton–Schulz dtype of a parameter of ``shape`` (as :func:`orthogonalize` picks)."""
        dtype = group["ns_dtype"]
        if dtype is not None:
            return dtype
        return default_compute_dtype(device, matrix_shape(shape, group["matrix_view"])[1:])

    def _split_orthogonalize(
        self, group: Mapping[str, Any], directions: list[Tensor]
    ) -> list[Tensor]:
        """Replicated directions (DDP): each rank orthogonalizes its share, all-gather the rest."""
        split = self.work_split
        assert split is not None
        specs = [
            [TensorSpec(tuple(d.shape), self._compute_dtype(group, d.device, d.shape), d.device)]
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
        dtypes = [self._compute_dtype(group, p.device, tuple(p.shape)) for p in params]

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

    def _create_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        """The missing state of ``p``: the momentum and the variant's second moment (NorMuon's per
        row in at least float32 -- it is tiny; AdaMuon's in ``p``'s dtype, like the momentum, or in
        the group's ``state_dtype``)."""
        state = self.state[p]
        stored = group.get("state_dtype")  # None: p's dtype (and a group saved without the key)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = state_zeros(p, stored)
        variant = group["variant"]
        key = SECOND_MOMENT.get(variant)
        if key is None or key in state:
            return
        if variant == "normuon":
            shape = second_moment_shape(p.shape, group["matrix_view"], variant)
            dtype = torch.promote_types(p.dtype, torch.float32)
            state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        else:
            state[key] = state_zeros(p, stored)

    def init_matrix_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        self._create_state(p, group)

    def matrix_state(
        self, p: Tensor, group: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], Mapping[str, tuple[int, ...]]]:
        keys: tuple[str, ...] = ("momentum_buffer",)
        shapes = {"momentum_buffer": tuple(p.shape)}
        key = SECOND_MOMENT.get(group.get("variant", "muon"))
        if key is not None:
            keys += (key,)
            shape = second_moment_shape(p.shape, group["matrix_view"], group["variant"])
            shapes[key] = shape  # type: ignore[assignment]  # not None for a variant
        return keys, shapes

    def matrix_diagnostics(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        dtype = self._compute_dtype(group, p.device, tuple(p.shape))
        return {"preconditioner": "newton-schulz", "ns_dtype": str(dtype).removeprefix("torch.")}

    def _extra_diagnostics(self) -> dict[str, Any]:
        # What ns_dtype=None chose from: detected once per process (newton_schulz.cpu_bf16_matmul).
        return {**super()._extra_diagnostics(), "cpu_bf16_matmul": cpu_bf16_matmul()}


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
    variant: MuonVariant = "muon",
    beta2: float = DEFAULT_BETA2,
    eps: float = DEFAULT_EPS,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    compile_update: bool = False,
    adamw_lr: float = DEFAULT_ADAMW_LR,
    adamw_betas: tuple[float, float] = DEFAULT_ADAMW_BETAS,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    routing: Mapping[str, str] | None = None,
    routing_policy: RoutingPolicy | None = None,
    example_inputs: Any = None,
    on_nonfinite: str = "skip",
    state_dtype: torch.dtype | str | None = None,
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
        variant=variant,
        beta2=beta2,
        eps=eps,
        cautious=cautious,
        cautious_weight_decay=cautious_weight_decay,
        compile_update=compile_update,
        adamw_lr=adamw_lr,
        adamw_betas=adamw_betas,
        adamw_eps=adamw_eps,
        adamw_weight_decay=adamw_weight_decay,
        on_nonfinite=on_nonfinite,
        state_dtype=state_dtype,
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


# ------------------------------------------------------------------------- NorMuon and AdaMuon

# The authors' defaults: the class defaults of their code (zichongli5/NorMuon normuon.py, with
# its auxiliary Adam; Chongjie-Si/AdaMuon gpt2/models/optimizers/adamuon.py), AdamW groups as
# Muon's. AdaMuon's GPT-2 runs instead shared lr 6e-4 and weight decay 0.1 with AdamW (its step
# has Adam's RMS); on the model zoo's 60-step problems that lr leaves an LSTM at 0.995 of its
# initial loss (0.86 at 0.02), so the code's defaults are the registry's.
NORMUON_DEFAULTS: Final[dict[str, Any]] = dict(
    lr=DEFAULT_LR,
    momentum=DEFAULT_MOMENTUM,
    beta2=0.95,
    eps=1e-10,
    weight_decay=0.0,
    adjust_lr="original",
    adamw_lr=DEFAULT_ADAMW_LR,
    adamw_betas=DEFAULT_ADAMW_BETAS,
    adamw_eps=1e-10,
)
ADAMUON_DEFAULTS: Final[dict[str, Any]] = dict(
    lr=DEFAULT_LR,
    momentum=DEFAULT_MOMENTUM,
    beta2=0.95,
    eps=1e-8,
    weight_decay=0.01,
    adjust_lr="match_rms_adamw",
    adamw_lr=DEFAULT_ADAMW_LR,
    adamw_betas=DEFAULT_ADAMW_BETAS,
)


def _variant_factory(variant: str, defaults: Mapping[str, Any], doc: str) -> Any:
    """:func:`muon` with ``variant`` fixed and ``defaults`` as its defaults (its signature says
    so, for ``create``'s list of accepted hyper-parameters and for ``help()``)."""
    signature = inspect.signature(muon)
    parameters = [
        q.replace(default=defaults[q.name]) if q.name in defaults else q
        for q in signature.parameters.values()
        if q.name != "variant"
    ]

    def factory(target: nn.Module | Iterable[Any], **hyperparams: Any) -> Muon:
        return muon(target, variant=variant, **{**defaults, **hyperparams})  # type: ignore[arg-type]

    factory.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    factory.__name__ = factory.__qualname__ = variant
    factory.__doc__ = doc
    factory.__module__ = __name__
    return factory


normuon = _variant_factory(
    "normuon",
    NORMUON_DEFAULTS,
    """A :class:`Muon` with ``variant="normuon"`` (NorMuon, arXiv 2510.05491) and the authors'
    defaults: lr 0.02, momentum 0.95, beta2 0.95, eps 1e-10, no weight decay; AdamW groups 3e-4,
    (0.9, 0.95), eps 1e-10. Arguments as :func:`muon`.""",
)
adamuon = _variant_factory(
    "adamuon",
    ADAMUON_DEFAULTS,
    """A :class:`Muon` with ``variant="adamuon"`` (AdaMuon, arXiv 2507.11005) and the authors'
    defaults: an Adam-sized step (``adjust_lr="match_rms_adamw"``: RMS 0.2·lr) at lr 0.02 with
    weight decay 0.01, momentum and beta2 0.95, eps 1e-8; AdamW groups as Muon's (3e-4).
    Arguments as :func:`muon`.""",
)

NORMUON_SPEC = register(
    OptimizerSpec(
        name="normuon",
        family="layer-wise",
        rule="O = NS(D) as muon; V = EMA(rowmean(O²)); p -= lr*scale*‖O‖·Ô/‖Ô‖, Ô = O/(√V+eps)",
        state="1x (momentum) + 1 float per row (second moment) + AdamW 2x for routed-out params",
        state_buffers=1.0,
        reference="Li et al. 2025, arXiv 2510.05491",
        factory=normuon,
        defaults=NORMUON_DEFAULTS,
        routes=True,
    )
)
ADAMUON_SPEC = register(
    OptimizerSpec(
        name="adamuon",
        family="layer-wise",
        rule="O = NS(sign(D)); V = EMA(O²); p -= lr*0.2*√(mn)·Ô/‖Ô‖, Ô = O/(√V+eps)",
        state="2x (momentum, element-wise second moment) + AdamW 2x for routed-out params",
        state_buffers=2.0,
        reference="Si, Zhang & Shen 2025, arXiv 2507.11005",
        factory=adamuon,
        defaults=ADAMUON_DEFAULTS,
        routes=True,
    )
)
