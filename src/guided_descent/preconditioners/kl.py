"""KL-Shampoo's factor estimation as free functions (Lin et al. 2025, arXiv 2509.03378).

Shampoo's factors ``L = E[G Gᵀ]``, ``R = E[Gᵀ G]`` each fit the gradient covariance with the other
side held at the identity. Read as covariance estimation, the Kronecker model ``L ⊗ R`` of
``E[vec G vec Gᵀ]`` that minimises ``KL(E[g gᵀ] ‖ L ⊗ R)`` in both factors at once satisfies ::

    L = E[G R⁻¹ Gᵀ] / n,    R = E[Gᵀ L⁻¹ G] / m          G: (m, n)

(for an order-``k`` tensor: ``F_i = E[G_(i) (⊗_{j≠i} F_j⁻¹) G_(i)ᵀ] · n_i / N``, ``N`` the number
of entries). Its preconditioner is ``(L ⊗ R)^(-1/2) = L^(-1/2) ⊗ R^(-1/2)``: a square root per
factor, not Shampoo's fourth root, and of the right scale without grafting. For ``g`` Gaussian
with covariance ``A ⊗ B`` the fixed point is ``L = c A``, ``R = B / c``.

The practical scheme (the paper's recommended variant; the authors' code, yorkerlin/KL-Methods)
keeps, per dimension ``i``, an eigenbasis ``Q_i`` of ``F_i`` and estimates of its eigenvalues
``d_i`` separately, as SOAP does with Adam's second moment: every step, with the bases fixed, ::

    F_i ← β F_i + (1 - β) · n_i/N · X_(i) X_(i)ᵀ,      X = G ×_{j≠i} diag(d_j)^(-1/2) Q_jᵀ
    d_i ← max(β d_i + (1 - β) · n_i/N · Σ_{others} (X ×_i Q_iᵀ)², floor_i)

where ``F̂_j = Q_j diag(d_j) Q_jᵀ`` stands in for ``F_j`` inside the update (so ``X_(i) X_(i)ᵀ =
G_(i) (⊗ F̂_j⁻¹) G_(i)ᵀ``), and every ``precondition_frequency`` steps ``Q_i`` is refreshed from
``F_i`` by one (unsorted) power step and QR, ``Q_i ← qr(F_i Q_i)``
(:func:`guided_descent.preconditioners.soap.refresh_bases` with ``sort=False``).
The authors start ``d_i`` at a constant (0.1); the optimizers here, by default, at the first
gradient's scale. ``floor_i = 1 / max(10, min(n_i, clamp))²`` bounds how far one factor may
amplify a direction (the authors' clamping).

A dimension without a basis (too long, length 1, or a vector's only dimension) keeps a diagonal
factor: ``Q_i = I`` and only ``d_i``. With every dimension diagonal the scheme is RMSprop's.

Tensors here may carry leading *batch* dimensions (SOAP's ``(count, m, n)`` stacks for the
``"split:K"``/``"batch"`` views): every basis ``(*batch, n_i, n_i)`` and eigenvalue vector
``(*batch, n_i)`` then belongs to one matrix of the stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from guided_descent.transforms.masking import commit_


def eigenvalue_floor(n: int, clamp: float | None) -> float:
    """The smallest eigenvalue estimate kept for a dimension of length ``n``: the authors cap
    ``d^(-1/2)`` at ``max(10, min(n, clamp))`` (``None``: no floor, 0)."""
    if clamp is None:
        return 0.0
    return 1.0 / max(10.0, min(float(n), float(clamp))) ** 2


def _rotate(x: Tensor, Q: Tensor, dim: int, transpose: bool) -> Tensor:
    """``x ×_dim Q`` (``Qᵀ`` with ``transpose``): every fibre along ``dim`` multiplied by the
    ``(*batch, n, n)`` matrix of its batch entry (``Q.dim() - 2`` leading batch dimensions)."""
    batch = Q.dim() - 2
    moved = x.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(*shape[:batch], -1, shape[-1])  # (*batch, rest, n): fibres as rows
    out = flat @ (Q if transpose else Q.mT)  # row vᵀ -> (Qᵀ v)ᵀ = vᵀ Q, (Q v)ᵀ = vᵀ Qᵀ
    return out.reshape(shape).movedim(-1, dim)


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    """The ``(*batch, n)`` vector ``v`` shaped to broadcast along dimension ``dim`` of an
    ``ndim``-D tensor with the same leading batch dimensions."""
    batch = v.dim() - 1
    shape = [1] * ndim
    shape[:batch] = v.shape[:batch]
    shape[dim] = v.shape[-1]
    return v.reshape(shape)


def _outer(x: Tensor, dim: int, batch: int) -> Tensor:
    """``x_(dim) x_(dim)ᵀ`` per batch entry: ``(*batch, n, n)``, every other dimension
    contracted."""
    moved = x.movedim(dim, batch)
    flat = moved.reshape(*moved.shape[: batch + 1], -1)  # (*batch, n, rest)
    return flat @ flat.mT


def kl_statistics(
    grad: Tensor,
    bases: Sequence[Tensor | None],
    eigenvalues: Sequence[Tensor],
    batch: int = 0,
) -> tuple[list[Tensor | None], list[Tensor]]:
    """The KL statistics of one gradient, from the current bases and eigenvalue estimates.

    ``grad`` ``(*batch, n_0, ..., n_{k-1})``; ``bases[i]`` ``(*batch, n_i, n_i)`` or ``None``
    (a diagonal dimension); ``eigenvalues[i]`` ``(*batch, n_i)``, all in one dtype. Returns
    ``(factors, diagonals)``: per dimension with a basis ``n_i/N · X_(i) X_(i)ᵀ`` (``None``
    elsewhere), and per dimension ``n_i/N · Σ (X ×_i Q_iᵀ)²`` over the other dimensions, the
    quantities the module docstring's two updates average (``X`` depends on ``i``).
    """
    k = grad.dim() - batch
    if len(bases) != k or len(eigenvalues) != k:
        raise ValueError(
            f"kl_statistics: grad of shape {tuple(grad.shape)} with {batch} batch dimensions "
            f"needs {k} bases and eigenvalue vectors, got {len(bases)} and {len(eigenvalues)}"
        )
    dims = [batch + i for i in range(k)]
    numel = math.prod(grad.shape[batch:])
    inv_sqrt = [d.rsqrt() for d in eigenvalues]  # (*batch, n_i): d_i^(-1/2)
    # Rotated into every other dimension's basis (never its own): X_i before the scaling.
    others: list[Tensor] = []
    for i in range(k):
        x = grad
        for j in range(k):
            if j != i and bases[j] is not None:
                x = _rotate(x, bases[j], dims[j], transpose=True)
        others.append(x)
    factors: list[Tensor | None] = []
    diagonals: list[Tensor] = []
    for i in range(k):
        x = others[i]
        for j in range(k):
            if j != i:
                x = x * _along(inv_sqrt[j], dims[j], grad.dim())
        scale = grad.shape[dims[i]] / numel
        Q = bases[i]
        factors.append(None if Q is None else _outer(x, dims[i], batch) * scale)
        rotated = x if Q is None else _rotate(x, Q, dims[i], transpose=True)
        squares = rotated.square().movedim(dims[i], -1)
        squares = squares.reshape(*squares.shape[:batch], -1, squares.shape[-1])
        diagonals.append(squares.sum(-2) * scale)  # (*batch, n_i)
    return factors, diagonals


def update_eigenvalues_(
    eigenvalues: Sequence[Tensor],
    diagonals: Sequence[Tensor],
    beta: float,
    floors: Sequence[float],
    ok: Tensor | None = None,
) -> None:
    """``d_i ← max(β d_i + (1 - β) diag_i, floor_i)`` in place (only where ``ok``, if given)."""
    for d, diag, floor in zip(eigenvalues, diagonals, floors, strict=True):
        new = d.lerp(diag, 1.0 - beta).clamp_min_(floor)
        if ok is None:
            d.copy_(new)
        else:
            commit_(d, new, ok)


def kronecker_root(eigenvalues: Sequence[Tensor], batch: int = 0) -> Tensor:
    """``sqrt(d_0 ⊗ d_1 ⊗ ...)``: the rotated preconditioner's denominator, of shape
    ``(*batch, n_0, ..., n_{k-1})``."""
    k = len(eigenvalues)
    out = None
    for i, d in enumerate(eigenvalues):
        term = _along(d.sqrt(), batch + i, batch + k)
        out = term if out is None else out * term
    assert out is not None
    return out
