"""Symmetric eigendecomposition that degrades gracefully, and inverse p-th roots built on it.

Preconditioner factors (Shampoo's ``G Gᵀ`` statistics, K-FAC's activation covariances) are
symmetric positive semi-definite in exact arithmetic but often singular, badly conditioned
(κ up to 1e10 is routine) or, in bfloat16 training, slightly indefinite. ``torch.linalg.eigh`` can
then fail to converge or, on some back-ends, return NaN. :func:`eigh` retries in float64 and then
with a growing diagonal jitter; if everything fails it raises :class:`MatrixFunctionError`, which
optimizers catch to keep their last good preconditioner. It never returns NaN.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from guided_descent.linalg.finite import all_finite


class MatrixFunctionError(RuntimeError):
    """A matrix function could not produce a finite result (e.g. the input holds NaN/Inf)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precisions lose too much for a decomposition: work in float32 at least.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _try_eigh(A: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        vals, vecs = torch.linalg.eigh(A)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None
    if not (all_finite(vals) and all_finite(vecs)):
        return None
    return vals, vecs


def eigh(A: Tensor, *, jitter: float = 1e-10, attempts: int = 4) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric matrix (or batch) ``A``.

    Tries, in order: the compute dtype (float32, or float64 for float64 input); float64; float64
    with ``jitter * mean(|diag A|) * 10**k`` added to the diagonal for ``k = 0 .. attempts-1``.
    Only the lower triangle is read, as in ``torch.linalg.eigh``; the input is symmetrized first so
    that asymmetric rounding noise does not matter.

    Returns tensors in the compute dtype. Raises :class:`MatrixFunctionError` when ``A`` holds
    non-finite values or no attempt succeeds.
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"eigh needs square matrices (..., n, n), got shape {tuple(A.shape)}")
    if not all_finite(A):
        raise MatrixFunctionError("eigh input holds NaN or Inf")
    dtype = _compute_dtype(A.dtype)
    A = A.to(dtype)
    A = 0.5 * (A + A.mT)
    out = _try_eigh(A)
    if out is not None:
        return out
    A64 = A.double()
    out = _try_eigh(A64)
    if out is None:
        n = A.shape[-1]
        eye = torch.eye(n, dtype=torch.float64, device=A.device)
        scale = A64.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)[..., None, None]
        for k in range(attempts):
            out = _try_eigh(A64 + (jitter * 10**k) * scale * eye)
            if out is not None:
                break
    if out is None:
        raise MatrixFunctionError(f"eigh failed after float64 and {attempts} jittered retries")
    vals, vecs = out
    return vals.to(dtype), vecs.to(dtype)


def damping(
    vals: Tensor, eps: float = 0.0, relative: bool = False, relative_eps: float = 0.0
) -> Tensor | float:
    """The damping added to clamped eigenvalues ``vals`` ``(..., n)``: ``eps`` (times λ_max with
    ``relative=True``) plus ``relative_eps · λ_max``; a float when no part is relative."""
    if not relative and not relative_eps:
        return eps
    top = vals.clamp_min(0.0).amax(-1, keepdim=True).clamp_min(torch.finfo(vals.dtype).tiny)
    return (eps if relative else 0.0) * top + relative_eps * top + (0.0 if relative else eps)


def matrix_power_from_eigh(
    vals: Tensor,
    vecs: Tensor,
    power: float,
    eps: float = 0.0,
    relative: bool = False,
    relative_eps: float = 0.0,
) -> Tensor:
    """``V diag((max(λ, 0) + ε)^power) Vᵀ``; ε is :func:`damping` (``eps``, scaled by λ_max with
    ``relative=True``, plus ``relative_eps · λ_max``).

    Negative eigenvalues are rounding noise for a PSD factor and are clamped to 0 before the
    damping ``ε`` is added, so a negative power stays finite whenever ``ε > 0``.
    """
    eps = damping(vals, eps, relative, relative_eps)
    vals = vals.clamp_min(0.0)
    # The power in float64, rounded once to the compute dtype: torch's float32 pow rounds an
    # element differently depending on where it falls in the tensor (vectorized body or scalar
    # tail), so a factor's root would depend on which other factors share its batch -- and a
    # factor is batched with different ones on another rank or another refresh step.
    d = (vals.double() + (eps.double() if isinstance(eps, Tensor) else eps)).pow(power)
    d = d.to(vals.dtype)
    if not torch.isfinite(d).all():
        raise MatrixFunctionError(
            f"power {power} of an eigenvalue that is 0: pass eps > 0 (got eps={eps})"
        )
    scaled = vecs * d.unsqueeze(-2)
    if vecs.dim() == 2:
        return scaled @ vecs.mT
    # One product per matrix of a batch, for the same reason: a batched product can round a
    # matrix differently from a product of that matrix alone (measured for 3x3 on this CPU).
    n = vecs.shape[-1]
    pairs = zip(scaled.reshape(-1, n, n), vecs.reshape(-1, n, n), strict=True)
    return torch.stack([a @ v.mT for a, v in pairs]).reshape(vecs.shape)


def condition_number(eigenvalues: Tensor) -> Tensor:
    """``λ_max / λ_min`` of each spectrum ``(..., n)`` (a PSD matrix's eigenvalues), as ``(...)``.

    Negative eigenvalues (rounding noise of a PSD matrix) count as 0, and ``λ_min`` is floored at
    ``λ_max`` times the dtype's machine epsilon: the result is at most ``1 / eps`` (about 8e6 in
    float32, 5e15 in float64), which means "numerically singular" -- a larger number would only
    measure rounding. NaN for an all-zero spectrum, whose condition is undefined. Cheap: callers
    pass eigenvalues they already computed.
    """
    vals = eigenvalues.clamp_min(0.0)
    top = vals.amax(-1)
    floor = top * torch.finfo(vals.dtype).eps
    ratio = top / torch.maximum(vals.amin(-1), floor)
    return torch.where(top > 0, ratio, torch.full_like(ratio, float("nan")))


@overload
def inverse_root(
    A: Tensor,
    p: float,
    eps: float = ...,
    *,
    relative: bool = ...,
    relative_eps: float = ...,
    return_eigenvalues: Literal[False] = ...,
) -> Tensor: ...


@overload
def inverse_root(
    A: Tensor,
    p: float,
    eps: float = ...,
    *,
    relative: bool = ...,
    relative_eps: float = ...,
    return_eigenvalues: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def inverse_root(
    A: Tensor,
    p: float,
    eps: float = 1e-12,
    *,
    relative: bool = False,
    relative_eps: float = 0.0,
    return_eigenvalues: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``(A + εI)^(-1/p)`` for a symmetric PSD matrix (or batch) ``A``, via :func:`eigh`.

    ``eps`` is added to the (non-negatively clamped) eigenvalues; ``relative=True`` scales it by
    the largest eigenvalue, which makes the damping invariant to the scale of ``A``;
    ``relative_eps`` adds ``relative_eps · λ_max`` on top of an absolute ``eps``. The result is
    in float32 (float64 for float64 input). Raises :class:`MatrixFunctionError` instead of ever
    returning NaN. With ``return_eigenvalues=True`` returns ``(root, eigenvalues)``, the latter
    ``(..., n)`` ascending: the spectrum of the damped matrix the root was taken of (clamped
    eigenvalues plus the damping), for diagnostics such as :func:`condition_number` at no extra
    decomposition.
    """
    if p <= 0:
        raise ValueError(f"inverse_root needs a positive root p, got {p!r}")
    if eps < 0:
        raise ValueError(f"inverse_root needs eps >= 0, got {eps!r}")
    vals, vecs = eigh(A)
    root = matrix_power_from_eigh(vals, vecs, -1.0 / p, eps, relative, relative_eps)
    if not return_eigenvalues:
        return root
    return root, vals.clamp_min(0.0) + damping(vals, eps, relative, relative_eps)
