"""Kronecker-factored gradient statistics and mode products, shared by Shampoo and SOAP.

For a gradient tensor ``G`` of shape ``(n_0, ..., n_{k-1})``, its mode-``i`` unfolding ``G_(i)`` is
the ``(n_i, N / n_i)`` matrix whose row ``a`` lists every entry with index ``a`` in dimension ``i``.
The factor of dimension ``i`` is ::

    F_i = G_(i) G_(i)ᵀ        (n_i, n_i); for a matrix, F_0 = G Gᵀ ("L") and F_1 = Gᵀ G ("R")

and, when ``n_i`` is too large for a dense matrix, its diagonal ``diag(F_i)`` (row sums of squares
of ``G_(i)``). The Kronecker product of the ``F_i`` approximates the full-matrix AdaGrad statistic
``vec(G) vec(G)ᵀ`` (Gupta et al. 2018, arXiv 1802.09568, Lemma 8).

The *mode product* ``G ×_i M`` multiplies every mode-``i`` fibre by ``M``:
``(G ×_i M)_(i) = M G_(i)``.
Shampoo's update is ``G ×_0 P_0 ×_1 P_1 ...`` with ``P_i = F_i^{-1/2k}``; SOAP projects with
``×_i Q_iᵀ`` and back with ``×_i Q_i``. For a matrix these are ``P_0 G P_1`` and ``Q_0ᵀ G Q_1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor


def factor_name(dim: int, order: int) -> str:
    """State-key stem of a dimension's factor: ``"L"``/``"R"`` for matrices, else ``"dim{i}"``."""
    if order == 2:
        return ("L", "R")[dim]
    return f"dim{dim}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factor statistics are kept and decomposed in: float64 for float64, else float32.

    bfloat16 keeps 8 mantissa bits: a sum of squared gradients in it loses every contribution
    smaller than 1/256 of the running total, and the small eigenvalues a preconditioner amplifies
    are exactly those.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _other_dims(x: Tensor, dim: int) -> list[int]:
    return [d for d in range(x.dim()) if d != dim]


def kronecker_factor(x: Tensor, dim: int) -> Tensor:
    """``x_(dim) x_(dim)ᵀ``, ``(n, n)`` with ``n = x.shape[dim]``, in ``x``'s dtype."""
    others = _other_dims(x, dim)
    # tensordot contracts every other dimension at once, without materializing the unfolding.
    return torch.tensordot(x, x, dims=(others, others))


def diagonal_factor(x: Tensor, dim: int) -> Tensor:
    """``diag(x_(dim) x_(dim)ᵀ)``: the sum of squares of each mode-``dim`` slice, shape ``(n,)``."""
    others = _other_dims(x, dim)
    if not others:
        return x * x
    return (x * x).sum(dim=others)


def mode_product(
    x: Tensor, matrices: Sequence[Tensor | None], *, transpose: bool = False
) -> Tensor:
    """``x ×_0 M_0 ×_1 M_1 ... ×_{k-1} M_{k-1}`` (``Mᵢᵀ`` with ``transpose=True``).

    ``matrices[i]`` is an ``(n_i, n_i)`` matrix, a length-``n_i`` vector (a diagonal matrix) or
    ``None`` (the identity). ``x`` is a ``k``-D tensor; the result has its shape and the dtype the
    multiplication promotes to. With ``None`` on every side the result is ``x`` itself (a view):
    do not modify it in place.
    """
    if len(matrices) != x.dim():
        raise ValueError(
            f"mode_product needs one matrix (or None) per dimension of x: x has shape "
            f"{tuple(x.shape)}, got {len(matrices)}"
        )
    # Each pass contracts the leading dimension and appends the result as the last one; after k
    # passes the dimensions are back in their original order.
    for M in matrices:
        if M is None:
            x = x.movedim(0, -1)
        elif M.dim() == 1:
            x = (x * M.reshape(-1, *([1] * (x.dim() - 1)))).movedim(0, -1)
        else:
            # result[..., a] = sum_j x[j, ...] * M[a, j]   (or M[j, a] for the transpose)
            x = torch.tensordot(x, M, dims=([0], [0 if transpose else 1]))
    return x


def size_buckets(matrices: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``matrices`` grouped by (shape, dtype, device), for one batched call per group."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, M in enumerate(matrices):
        buckets[(tuple(M.shape), M.dtype, M.device)].append(i)
    return dict(buckets)
