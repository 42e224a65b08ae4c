"""Keeping an eigenbasis of a slowly changing PSD matrix up to date, cheaply.

SOAP (Vyas et al. 2024, arXiv 2409.11321) runs Adam in the eigenbasis of Shampoo's factors. The
factors are exponential moving averages, so between two refreshes they move little, and the old
basis ``Q`` is an excellent starting point: one step of subspace (block power) iteration ::

    λ̃ = diag(Qᵀ P Q)                 # Rayleigh quotients: the eigenvalues Q currently estimates
    π = argsort(λ̃, descending)       # keep columns ordered largest first
    Q ← qr(P Q[:, π])                  # one power step, re-orthonormalized

costs one matrix product (the Rayleigh quotients reuse it) and a QR; a full ``eigh`` is used only
for the first basis (:func:`eigenbasis`). Repeated refreshes of a fixed ``P`` converge to its
eigenvectors (ordered by eigenvalue), at a rate set by the ratios of neighbouring eigenvalues. The
step is not cheaper than ``eigh`` everywhere: on CPU in float32 a bare ``eigh`` measured 1.0-1.4x
cheaper for n >= 128 (and more below, where the step's fixed overhead dominates; docs/benchmarks.md,
"Refresh cost"). What it buys is a basis continuous in the old one: a bare ``eigh`` picks an
arbitrary basis inside clusters of eigenvalues, and the tie-broken ``eigh`` that avoids that costs
more (n >= 128) and lands further from ``P``'s eigenvectors.

Sorting first keeps QR's column order aligned with the eigenvalue order, which power iteration
needs (QR orthogonalizes column ``j`` against the columns before it, so larger-eigenvalue columns
must come first). The caller keeps per-direction statistics in this basis (SOAP's Adam second
moment), so it must apply the same permutation ``π`` to them: :func:`refresh_eigenbasis` returns it.

Signs: a QR factor is unique only up to the signs of its columns; they are fixed so that
``diag(R) >= 0``. Then a column whose direction has converged stays the same vector from one refresh
to the next instead of flipping.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from guided_descent.linalg.finite import finite_matrices
from guided_descent.linalg.matrix_functions import eigh


class EigenbasisRefresh(NamedTuple):
    """The result of :func:`refresh_eigenbasis` (batch shape ``...`` as in its inputs).

    ``basis``: ``(..., n, n)``, orthonormal columns ordered by descending estimated eigenvalue.
    ``order``: ``(..., n)`` int64; new column ``j`` refines old column ``order[j]``, so statistics
    kept per column are re-indexed as ``stats[..., order]``. The identity where ``ok`` is False.
    ``ok``: ``(...)`` bool; False where the refresh failed and the old basis was kept.
    """

    basis: Tensor
    order: Tensor
    ok: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # A power step in bfloat16 would lose the small eigen-directions entirely; float64 callers
    # (tests, references) keep their precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_square(name: str, A: Tensor) -> None:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square matrices (..., n, n), got shape {tuple(A.shape)}")


def eigenbasis(P: Tensor) -> Tensor:
    """Eigenvectors of the symmetric PSD ``P`` ``(..., n, n)`` as columns, largest eigenvalue first.

    Uses the canonical :func:`guided_descent.linalg.matrix_functions.eigh` (float64 and jitter
    fallbacks) and so raises :class:`~guided_descent.linalg.matrix_functions.MatrixFunctionError`
    rather than returning NaN. The result is float32 (float64 for float64 input).
    """
    _check_square("eigenbasis: P", P)
    _, vecs = eigh(P)  # ascending eigenvalues
    return vecs.flip(-1)


@overload
def refresh_eigenbasis(
    P: Tensor, Q: Tensor, *, return_estimates: Literal[False] = ..., sort: bool = ...
) -> EigenbasisRefresh: ...


@overload
def refresh_eigenbasis(
    P: Tensor, Q: Tensor, *, return_estimates: Literal[True], sort: bool = ...
) -> tuple[EigenbasisRefresh, Tensor]: ...


def refresh_eigenbasis(
    P: Tensor, Q: Tensor, *, return_estimates: bool = False, sort: bool = True
) -> EigenbasisRefresh | tuple[EigenbasisRefresh, Tensor]:
    """One sorted subspace-iteration step ``Q ← qr(P Q[:, π])`` (see the module docstring).

    Args:
        P: ``(..., n, n)`` symmetric PSD matrices (e.g. Shampoo's factor ``L``), any float dtype.
        Q: ``(..., n, n)`` the current orthonormal bases, same shape as ``P``.
        return_estimates: also return the Rayleigh quotients ``diag(Qᵀ P Q)`` ``(..., n)``,
            sorted descending: the eigenvalues the old basis estimates, computed anyway for the
            sort (e.g. for a condition-number estimate at no extra cost).
        sort: ``False`` skips the sort: ``Q ← qr(P Q)`` with the identity order (estimates in
            column order). The step is then continuous in ``P`` (a sort flips where two
            estimates tie), at the price of columns that may drift to other eigen-directions
            over several refreshes; KL-Shampoo's authors refresh this way.

    Computes in float32 (float64 when ``P`` is float64). Never returns NaN and never raises for
    bad values: where ``P`` or the result is not finite, or QR fails, the old basis is returned
    (in the compute dtype) with the identity order and ``ok=False``.
    """
    _check_square("refresh_eigenbasis: P", P)
    if Q.shape != P.shape:
        raise ValueError(
            f"refresh_eigenbasis: Q must have P's shape {tuple(P.shape)}, got {tuple(Q.shape)}"
        )
    dtype = _compute_dtype(P.dtype)
    P = P.to(dtype)  # (..., n, n)
    Q = Q.to(dtype)  # (..., n, n)
    n = P.shape[-1]
    identity = torch.arange(n, device=P.device).expand(*P.shape[:-1]).clone()  # (..., n)

    PQ = P @ Q
    estimates = (Q * PQ).sum(-2)  # diag(Qᵀ P Q): the Rayleigh quotient of every column
    finite_in = torch.isfinite(estimates).all(-1)
    # Stable sort: tied columns (e.g. a zero factor) keep their order, so a refresh of an already
    # converged basis changes nothing.
    if sort:
        order = torch.where(finite_in[..., None], estimates, 0.0).argsort(
            dim=-1, descending=True, stable=True
        )
    else:
        order = identity
    columns = order.unsqueeze(-2).expand(P.shape)
    # P (Q[:, π]) = (P Q)[:, π]: reorder the product instead of multiplying again.
    try:
        Q_new, R = torch.linalg.qr(PQ.gather(-1, columns))
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        failed = torch.zeros(P.shape[:-2], dtype=torch.bool, device=P.device)
        result = EigenbasisRefresh(Q, identity, failed)
        return (result, estimates) if return_estimates else result
    signs = R.diagonal(dim1=-2, dim2=-1).sign()
    signs = torch.where(signs == 0, 1.0, signs)  # rank-deficient P: leave those columns be
    Q_new = Q_new * signs.unsqueeze(-2)

    ok = finite_in & finite_matrices(Q_new)
    basis = torch.where(ok[..., None, None], Q_new, Q)
    result = EigenbasisRefresh(basis, torch.where(ok[..., None], order, identity), ok)
    if not return_estimates:
        return result
    return result, estimates.gather(-1, order)
