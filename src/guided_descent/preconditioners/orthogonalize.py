"""Muon's update as free functions of tensors: momentum, matrix views, orthogonalization, scaling.

For a parameter ``W`` seen as one or more ``(m, n)`` matrices, its gradient ``g`` and its momentum
buffer ``M`` (Jordan et al. 2024)::

    M = mu * M + (1 - mu) * g                   # an EMA of the gradient
    D = (1 - mu) * g + mu * M   if nesterov     # look one step ahead
        M                       otherwise
    O = newton_schulz(D)                        # ≈ U Vᵀ of each matrix of D = U Σ Vᵀ
    W = W * (1 - lr * weight_decay)             # decoupled weight decay, as in AdamW
    W = W - lr * scale(m, n) * O

The EMA form of the buffer differs from the summed form ``M = mu M + g`` only by the constant
factor ``1 - mu``, which the Frobenius normalization inside Newton–Schulz removes; the EMA is what
``torch.optim.Muon`` keeps under the same state name, so their buffers are interchangeable.

**Which matrices.** A 2-D parameter ``(m, n)`` is one matrix. Otherwise the param group's
``matrix_view`` decides (:mod:`guided_descent.preconditioners.views`): ``"flatten"`` (default)
makes a convolution kernel ``(out, in, *kernel)`` one ``(out, in·prod(kernel))`` matrix (Jordan et
al.'s convention), ``"batch"`` a stack ``(..., m, n)`` separate matrices, and ``"split:K"`` the
rows ``K`` stacked matrices (Q, K and V of a packed attention projection, a GRU's gates). Each
matrix is orthogonalized and scaled on its own.

**Scaling.** ``U Vᵀ`` has ``min(m, n)`` singular values equal to 1, so its entries' RMS is
``1/sqrt(max(m, n))`` (Newton–Schulz's output: about that); ``scale(m, n)`` sets the update size
per shape:

* ``"original"`` -- ``sqrt(max(1, m/n))``: Jordan et al.'s, for the learning rate ~0.02; the
  update's RMS is then ``1/sqrt(n)`` for every shape (``n``: columns, the fan-in of a layer);
* ``"match_rms_adamw"`` -- ``0.2 * sqrt(max(m, n))``: the update's RMS becomes 0.2, about that of
  an AdamW update (Liu et al. 2025, arXiv 2502.16982), so AdamW's learning rate and weight decay
  carry over.

**Batching.** Matrices of one ``(m, n)`` shape (and device) are stacked into a single
``(B, m, n)`` Newton–Schulz call, so a model with many equal-shaped layers pays one set of
matmul launches per iteration instead of one per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from guided_descent.linalg.newton_schulz import (
    Coefficients,
    default_compute_dtype,
    newton_schulz,
)
from guided_descent.preconditioners.views import matrix_shape
from guided_descent.transforms.descend import step_rms
from guided_descent.transforms.masking import commit_

__all__ = [
    "ADJUST_LR",
    "AdjustLR",
    "MatrixView",
    "matrix_shape",
    "momentum_direction",
    "muon_update",
    "orthogonalize",
    "shape_scale",
]

AdjustLR = Literal["original", "match_rms_adamw"]
ADJUST_LR: tuple[str, ...] = get_args(AdjustLR)
MatrixView = str  # "flatten", "batch" or "split:K": see guided_descent.preconditioners.views


def momentum_direction(
    grad: Tensor, buf: Tensor, momentum: float, nesterov: bool, ok: Tensor | None = None
) -> Tensor:
    """Update ``buf`` in place to ``mu buf + (1 - mu) grad``; return the direction to orthogonalize.

    With ``nesterov`` the direction is a fresh tensor ``(1 - mu) grad + mu buf``; without, it is
    ``buf`` itself (do not modify it). ``grad`` is never modified. With ``ok`` (a 0-d bool
    tensor) ``buf`` changes only where it is true; the direction is computed either way.
    """
    if ok is None:
        buf.lerp_(grad, 1.0 - momentum)
        new = buf
    else:
        new = buf.lerp(grad, 1.0 - momentum)
        commit_(buf, new, ok)
    return grad.lerp(new, momentum) if nesterov else new


def shape_scale(m: int, n: int, adjust_lr: AdjustLR) -> float:
    """The factor that multiplies ``lr`` for an ``(m, n)`` matrix (see the module docstring)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")


def orthogonalize(
    updates: Sequence[Tensor],
    view: MatrixView,
    *,
    steps: int,
    coefficients: Coefficients | Sequence[Coefficients],
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
) -> list[Tensor]:
    """Newton–Schulz of every matrix of every update, one batched call per ``(m, n)`` shape.

    Each update is seen as matrices by :func:`matrix_shape`; results keep the updates' shapes and
    come back in the compute dtype (``dtype``, or the device default of
    :func:`~guided_descent.linalg.newton_schulz.default_compute_dtype`). The result equals calling
    :func:`~guided_descent.linalg.newton_schulz.newton_schulz` on each matrix alone, because every
    matrix of a batch is normalized and iterated independently.
    """
    buckets: dict[tuple[int, int, torch.device], list[int]] = {}
    views: list[tuple[int, int, int]] = []
    for i, u in enumerate(updates):
        count, m, n = matrix_shape(u.shape, view)
        views.append((count, m, n))
        buckets.setdefault((m, n, u.device), []).append(i)

    out: list[Tensor | None] = [None] * len(updates)
    for (m, n, device), members in buckets.items():
        compute = default_compute_dtype(device) if dtype is None else dtype
        # (count_i, m, n) each -> (sum count_i, m, n) in the compute dtype; one copy per step.
        stacked = torch.cat([updates[i].to(compute).reshape(-1, m, n) for i in members])
        orth = newton_schulz(stacked, steps, coefficients, dtype=compute, eps=eps)
        counts = [views[i][0] for i in members]
        for i, part in zip(members, orth.split(counts), strict=True):
            out[i] = part.reshape(updates[i].shape)
    return out  # type: ignore[return-value]  # every index was filled by its bucket


@torch.no_grad()
def muon_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adjust_lr: AdjustLR,
    matrix_view: MatrixView,
    ns_steps: int,
    ns_coefficients: Coefficients | Sequence[Coefficients],
    ns_dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    orthogonalizer: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ok: Tensor | None = None,
) -> list[Tensor]:
    """One Muon step in place on ``params`` and ``momentum_buffers`` (functional form).

    ``params``, ``grads`` and ``momentum_buffers`` are parallel lists of tensors of one shape each
    (buffers in the parameter's dtype). The update rule is in the module docstring. Returns the
    RMS of each parameter's step ``lr · scale · O`` (weight decay excluded) as 0-d tensors, for
    diagnostics: one norm per parameter, no host sync.

    ``orthogonalizer`` replaces the local :func:`orthogonalize` of the directions (same
    contract: the list of ``O``, one per direction, in the compute dtype); the optimizer passes
    one that splits the work across ranks. ``ok`` (a 0-d bool tensor) commits the step only where
    it is true: parameters and buffers are otherwise left bit-identical, without a host sync.
    """
    directions = [
        momentum_direction(g, buf, momentum, nesterov, ok)
        for g, buf in zip(grads, momentum_buffers, strict=True)
    ]
    if orthogonalizer is not None:
        orthogonal = orthogonalizer(directions)
    else:
        orthogonal = orthogonalize(
            directions,
            matrix_view,
            steps=ns_steps,
            coefficients=ns_coefficients,
            dtype=ns_dtype,
            eps=eps,
        )
    sizes = []
    for p, o in zip(params, orthogonal, strict=True):
        _, m, n = matrix_shape(p.shape, matrix_view)
        if weight_decay != 0.0 and ok is None:
            p.mul_(1.0 - lr * weight_decay)
        # o is in the compute dtype; the in-place add computes in the wider of the two dtypes and
        # rounds once into p's dtype (a bf16 parameter takes a float32 update without a bf16
        # round-trip of the update first).
        size = lr * shape_scale(m, n, adjust_lr)
        if ok is None:
            p.add_(o, alpha=-size)
        else:
            new = p.mul(1.0 - lr * weight_decay) if weight_decay != 0.0 else p
            commit_(p, new.add(o, alpha=-size), ok)
        sizes.append(step_rms(o, size))
    return sizes
