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

**Variants** (``variant=``). Two published refinements keep Muon's step and add a second moment
of the orthogonalized update ``O``, with the state it needs. They do not compose (AdaMuon's
element-wise moment subsumes NorMuon's per-row one and neither paper combines them), so they are
one choice, not two flags. Neither bias-corrects its moment: each ends by rescaling the step to a
fixed Frobenius norm, which removes any constant factor of ``V`` (a bias correction would only
change the weight of ``eps``), as in both authors' code.

* ``"normuon"`` -- NorMuon (Li et al. 2025, arXiv 2510.05491), as in the authors' code
  (``zichongli5/NorMuon``, ``normuon_update``): one second moment per neuron (row)::

      r_i = mean_j O_ij²                          # per row of each matrix
      V = beta2 * V + (1 - beta2) * r             # (rows, 1), float32
      Ô = O / (sqrt(V) + eps)                     # rows of equal RMS, over time
      Ô = Ô * ‖O‖_F / (‖Ô‖_F + eps)               # per matrix: same size as Muon's step
      W = W - lr * scale(m, n) * Ô

  Two deliberate differences from that code: a convolution kernel's neurons are its output
  channels (rows of the ``(out, in·k·k)`` matrix that is orthogonalized; the authors' code
  reshapes back to ``(out, in, kh, kw)`` before the row mean and so normalizes each run of ``kw``
  entries; pytorch_optimizer uses the flattened rows, as here); and the step's size is Muon's
  (preserved ``‖O‖_F`` times ``scale(m, n)``, the code's choice), not the exact RMS 0.2·lr of the
  paper's Algorithm 1 -- ``adjust_lr="match_rms_adamw"`` comes within the spread of ``O``'s
  singular values of it.
* ``"adamuon"`` -- AdaMuon (Si, Zhang & Shen 2025, arXiv 2507.11005), as in the authors' code of
  August 2025 (``Chongjie-Si/AdaMuon``: ``gpt2/models/optimizers/adamuon.py``, Megatron's
  ``ada_muon``), the sign-stabilized form of the paper's second version::

      O = newton_schulz(sign(D))                  # every entry of D made ±1 first
      V = beta2 * V + (1 - beta2) * O²            # element-wise, W's shape and dtype
      Ô = O / (sqrt(V) + eps)
      Ô = Ô * sqrt(min(m, n)) / (‖Ô‖_F + eps)     # the Frobenius norm of an exact U Vᵀ
      W = W - lr * scale(m, n) * Ô

  With ``adjust_lr="match_rms_adamw"`` (its registry default) the step's RMS is exactly
  ``0.2·lr``, the paper's RMS alignment with Adam, so AdamW's learning rate carries over. The
  authors' code ties ``beta2`` to the momentum (both 0.95); here it is its own hyper-parameter with
  that default. pytorch_optimizer 4.1.0's ``AdaMuon`` follows the paper's first version (no sign,
  a bias-corrected ``V``, a non-Nesterov ``beta1`` EMA); it agrees with this form exactly when the
  gradients have entries ±1 and the momentum is 0 (``sign`` is then the identity), which the
  tests pin.

**Cautious** (``cautious=``, ``cautious_weight_decay=``): the final step ``Ô`` (or ``O``) is masked
against the raw gradient ``g`` and the decay against ``W`` by
:mod:`guided_descent.transforms.cautious`, after the variant's normalization (which does not
change signs) and on the whole update, so the step taken has the cautious property. C-Optim's
``c_muon.py`` instead masks the momentum before orthogonalizing; Newton–Schulz then mixes the
coordinates again and the step taken can disagree with ``g`` anywhere, so it is not followed.
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
from guided_descent.transforms.cautious import cautious_update, decayed
from guided_descent.transforms.descend import step_rms
from guided_descent.transforms.masking import commit_
from guided_descent.transforms.state_dtype import compute_dtype

__all__ = [
    "ADJUST_LR",
    "MUON_VARIANTS",
    "AdjustLR",
    "MatrixView",
    "MuonVariant",
    "adamuon_normalize",
    "matrix_shape",
    "momentum_direction",
    "muon_update",
    "normuon_normalize",
    "orthogonalize",
    "second_moment_shape",
    "shape_scale",
]

AdjustLR = Literal["original", "match_rms_adamw"]
ADJUST_LR: tuple[str, ...] = get_args(AdjustLR)
MatrixView = str  # "flatten", "batch" or "split:K": see guided_descent.preconditioners.views
MuonVariant = Literal["muon", "normuon", "adamuon"]
MUON_VARIANTS: tuple[str, ...] = get_args(MuonVariant)


def momentum_direction(
    grad: Tensor, buf: Tensor, momentum: float, nesterov: bool, ok: Tensor | None = None
) -> Tensor:
    """Update ``buf`` in place to ``mu buf + (1 - mu) grad``; return the direction to orthogonalize.

    With ``nesterov`` the direction is a fresh tensor ``(1 - mu) grad + mu buf``; without, it is
    ``buf`` itself (do not modify it). ``grad`` is never modified. With ``ok`` (a 0-d bool
    tensor) ``buf`` changes only where it is true; the direction is computed either way.

    A ``buf`` stored in another dtype than ``grad``'s (``state_dtype``) is read widened
    (:func:`~guided_descent.transforms.state_dtype.compute_dtype`), updated there and rounded into
    ``buf`` once; the direction is formed from the unrounded value, in that wider dtype.
    """
    if buf.dtype != grad.dtype:
        dtype = compute_dtype(buf, grad)
        wide_grad = grad.to(dtype)
        new = buf.to(dtype).lerp(wide_grad, 1.0 - momentum)  # a fresh tensor, not buf
        commit_(buf, new, ok)
        return wide_grad.lerp(new, momentum) if nesterov else new
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
    come back in the compute dtype (``dtype``, or the default of
    :func:`~guided_descent.linalg.newton_schulz.default_compute_dtype` for the device and the
    ``(m, n)`` shape). The result equals calling
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
        compute = default_compute_dtype(device, (m, n)) if dtype is None else dtype
        # (count_i, m, n) each -> (sum count_i, m, n) in the compute dtype; one copy per step. A
        # bucket of one goes in as it is (newton_schulz copies it on its own: no second copy).
        parts = [updates[i].reshape(-1, m, n) for i in members]
        stacked = parts[0] if len(parts) == 1 else torch.cat([x.to(compute) for x in parts])
        orth = newton_schulz(stacked, steps, coefficients, dtype=compute, eps=eps)
        counts = [views[i][0] for i in members]
        for i, part in zip(members, orth.split(counts), strict=True):
            out[i] = part.reshape(updates[i].shape)
    return out  # type: ignore[return-value]  # every index was filled by its bucket


def second_moment_shape(
    shape: Sequence[int], view: MatrixView, variant: MuonVariant
) -> tuple[int, ...] | None:
    """The shape of ``variant``'s second moment for a parameter of ``shape`` seen through ``view``:
    ``None`` for plain Muon, one entry per row of its matrices ``(count·m, 1)`` for NorMuon (a 2-D
    ``(m, n)`` weight: ``(m, 1)``, as in the authors' code), ``shape`` itself for AdaMuon."""
    if variant == "muon":
        return None
    if variant == "normuon":
        count, m, _ = matrix_shape(tuple(shape), view)
        return (count * m, 1)
    if variant == "adamuon":
        return tuple(shape)
    raise ValueError(f"variant must be one of {MUON_VARIANTS}, got {variant!r}")


def _working_copy(o: Tensor) -> Tensor:
    """``o`` in at least float32 (Newton–Schulz's output may be bfloat16) and contiguous.

    Contiguous because the reductions below (row means, norms) sum in memory order: a tall
    matrix's Newton–Schulz result is a transposed view, while the same values received from
    another rank (a split step) are contiguous, and the replicas must round alike."""
    return o.to(torch.promote_types(o.dtype, torch.float32)).contiguous()


def _frobenius(x: Tensor) -> Tensor:
    """Per-matrix Frobenius norms of ``x`` (count, m, n), kept as (count, 1, 1)."""
    return torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)


def normuon_normalize(
    o: Tensor,
    row_sq: Tensor,
    view: MatrixView,
    *,
    beta2: float,
    eps: float,
    ok: Tensor | None = None,
) -> Tensor:
    """NorMuon's per-neuron normalization of one orthogonalized update (module docstring).

    ``o``: the parameter's Newton–Schulz output, its shape, compute dtype. ``row_sq``: its
    second moment, shape :func:`second_moment_shape` ``(count·m, 1)``, updated in place (only
    where ``ok``, a 0-d bool tensor, when given). Returns ``Ô`` in ``o``'s shape, at least
    float32.
    """
    count, m, n = matrix_shape(o.shape, view)
    x = _working_copy(o).reshape(count, m, n)
    rows = x.square().mean(dim=-1).reshape(row_sq.shape)  # (count·m, 1)
    if ok is None:
        new = row_sq.lerp_(rows.to(row_sq.dtype), 1.0 - beta2)
    else:
        new = row_sq.lerp(rows.to(row_sq.dtype), 1.0 - beta2)
        commit_(row_sq, new, ok)
    y = x / new.to(x.dtype).reshape(count, m, 1).sqrt().add_(eps)
    y = y * (_frobenius(x) / _frobenius(y).add_(eps))
    return y.reshape(o.shape)


def adamuon_normalize(
    o: Tensor,
    exp_avg_sq: Tensor,
    view: MatrixView,
    *,
    beta2: float,
    eps: float,
    ok: Tensor | None = None,
    widen: bool = False,
) -> Tensor:
    """AdaMuon's element-wise normalization and RMS rescaling of one orthogonalized update (of
    the sign of the direction: the caller takes it; module docstring).

    ``o``: the parameter's Newton–Schulz output, its shape, compute dtype. ``exp_avg_sq``: the
    element-wise second moment, the parameter's shape and dtype, updated in place (only where
    ``ok`` when given); it is formed in at least float32 and rounded into its dtype once, and the
    update divides by that rounded value on both paths. Returns ``Ô`` in ``o``'s shape, at least
    float32, with Frobenius norm ``sqrt(min(m, n))`` per matrix (up to ``eps``).

    ``widen``: ``exp_avg_sq`` is kept in another dtype than the parameter's (``state_dtype``): the
    moment is formed from its value widened to ``x``'s dtype, rounded once into ``exp_avg_sq``, and
    the update divides by the unrounded value -- the step the float32 path takes from that state.
    """
    count, m, n = matrix_shape(o.shape, view)
    x = _working_copy(o)
    if widen:
        v = exp_avg_sq.to(compute_dtype(exp_avg_sq, x)).mul(beta2).addcmul_(x, x, value=1.0 - beta2)
        commit_(exp_avg_sq, v, ok)
    elif ok is None:
        v = exp_avg_sq.mul_(beta2).addcmul_(x, x, value=1.0 - beta2)
    else:
        v = exp_avg_sq.mul(beta2).addcmul_(x, x, value=1.0 - beta2)
        commit_(exp_avg_sq, v, ok)
    y = (x / v.to(x.dtype).sqrt().add_(eps)).reshape(count, m, n)
    y = y * (math.sqrt(min(m, n)) / _frobenius(y).add_(eps))
    return y.reshape(o.shape)


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
    variant: MuonVariant = "muon",
    second_moments: Sequence[Tensor] | None = None,
    beta2: float = 0.95,
    moment_eps: float = 1e-8,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
) -> list[Tensor]:
    """One Muon step in place on ``params`` and ``momentum_buffers`` (functional form).

    ``params``, ``grads`` and ``momentum_buffers`` are parallel lists of tensors of one shape each
    (buffers in the parameter's dtype). The update rule is in the module docstring. Returns the
    RMS of each parameter's step ``lr · scale · O`` (weight decay excluded) as 0-d tensors, for
    diagnostics: one norm per parameter, no host sync. Buffers kept in another dtype
    (``state_dtype``) are read widened and rounded once when stored (:func:`momentum_direction`,
    :func:`adamuon_normalize`).

    ``orthogonalizer`` replaces the local :func:`orthogonalize` of the directions (same
    contract: the list of ``O``, one per direction, in the compute dtype); the optimizer passes
    one that splits the work across ranks. ``ok`` (a 0-d bool tensor) commits the step only where
    it is true: parameters and buffers are otherwise left bit-identical, without a host sync.

    ``variant`` ``"normuon"`` / ``"adamuon"`` need ``second_moments`` (one per parameter, shape
    :func:`second_moment_shape`; updated in place), decayed by ``beta2``, with ``moment_eps`` in
    their denominators (``eps`` is Newton–Schulz's normalization floor). ``cautious`` and
    ``cautious_weight_decay``: see the module docstring.
    """
    if variant not in MUON_VARIANTS:
        raise ValueError(f"variant must be one of {MUON_VARIANTS}, got {variant!r}")
    if variant != "muon" and (second_moments is None or len(second_moments) != len(params)):
        raise ValueError(f"variant {variant!r} needs one second moment per parameter")
    directions = [
        momentum_direction(g, buf, momentum, nesterov, ok)
        for g, buf in zip(grads, momentum_buffers, strict=True)
    ]
    if variant == "adamuon":
        # Sign-stabilized: Newton–Schulz sees the signs of the direction (a new tensor each, so
        # a non-Nesterov direction -- the buffer itself -- is not modified).
        directions = [torch.sign(d) for d in directions]
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
    moments = second_moments if variant != "muon" else [None] * len(params)
    sizes = []
    for p, g, o, sq in zip(params, grads, orthogonal, moments, strict=True):
        _, m, n = matrix_shape(p.shape, matrix_view)
        if variant == "normuon":
            o = normuon_normalize(o, sq, matrix_view, beta2=beta2, eps=moment_eps, ok=ok)
        elif variant == "adamuon":
            widen = sq.dtype != p.dtype  # a state_dtype other than the parameter's
            o = adamuon_normalize(
                o, sq, matrix_view, beta2=beta2, eps=moment_eps, ok=ok, widen=widen
            )
        if cautious:
            o = cautious_update(o, g)
        # o is in the compute dtype; the in-place add computes in the wider of the two dtypes and
        # rounds once into p's dtype (a bf16 parameter takes a float32 update without a bf16
        # round-trip of the update first).
        size = lr * shape_scale(m, n, adjust_lr)
        decay = lr * weight_decay
        if ok is None:
            decayed(p, o, decay, cautious_weight_decay, inplace=True)
            p.add_(o, alpha=-size)
        else:
            new = decayed(p, o, decay, cautious_weight_decay, inplace=False)
            commit_(p, new.add(o, alpha=-size), ok)
        sizes.append(step_rms(o, size))
    return sizes
