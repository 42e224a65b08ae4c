"""SOAP's update as free functions: Adam run in the eigenbasis of Shampoo's factors.

SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321)
keeps Shampoo's factors ``F_i`` (:mod:`guided_descent.preconditioners.kronecker`) only for their
eigenvectors ``Q_i`` and runs Adam in the rotated coordinates. For one parameter, gradient ``G``
(a matrix: ``Q_L = Q_0``, ``Q_R = Q_1``)::

    G' = G ×_i Q_iᵀ                              (matrix: Q_Lᵀ G Q_R)      rotate in
    m' = beta1 m' + (1 - beta1) G'               first moment, ROTATED space
    v' = beta2 v' + (1 - beta2) G'²              second moment, ROTATED space
    N' = m' / (1 - beta1^t) / (sqrt(v' / (1 - beta2^t)) + eps)
    N  = N' ×_i Q_i                              (matrix: Q_L N' Q_Rᵀ)     rotate back
    p  = p (1 - lr wd) - lr N
    F_i = shampoo_beta F_i + (1 - shampoo_beta) G_(i) G_(i)ᵀ
    every precondition_frequency steps: Q_i ← refresh_eigenbasis(F_i, Q_i), then
        m' ← m' ×_i (Q_i,newᵀ Q_i,old)   (:func:`rebase`: back with the old basis, in with the new)
        v' permuted to match (:func:`permute_rotated_`)

``m'`` is the paper's ``m ×_i Q_iᵀ`` kept as it is used: the moment is linear in the gradients,
so ``m' = m ×_i Q_iᵀ`` holds step by step for orthogonal bases, and the rotation of ``m`` each
step (two of a matrix's eight products) is replaced by a change of basis at each refresh. In
float arithmetic the two differ by rounding only (``tests/test_soap.py`` bounds it against the
dense original-space formula). ``v'`` cannot be carried to a new basis (a square does not
rotate), so it is only re-indexed (:func:`guided_descent.linalg.eigenbasis.refresh_eigenbasis`
returns the column permutation), as in the paper's algorithm. Dimensions longer than
``max_precond_dim``, and every dimension of a 0-D or 1-D parameter, keep the identity (plain Adam
along them); with the identity on every side SOAP is exactly AdamW.

The first basis is a full ``eigh`` of the factors accumulated from the first gradient
(:func:`initial_bases`); later ones are cheap power-iteration refreshes (:func:`refresh_bases`).
Both are batched over factors of one size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from guided_descent.linalg.eigenbasis import eigenbasis, refresh_eigenbasis
from guided_descent.linalg.matrix_functions import MatrixFunctionError, condition_number
from guided_descent.preconditioners.kronecker import mode_product, size_buckets
from guided_descent.transforms.masking import bias_correction, commit_
from guided_descent.transforms.state_dtype import compute_dtype as widest


def rotated_dims(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """Dimensions that get an eigenbasis: those of length ``2 .. max_precond_dim``, if >= 2-D."""
    if len(shape) < 2:
        return ()
    return tuple(i for i, n in enumerate(shape) if 1 < n <= max_precond_dim)


class MatrixBases(NamedTuple):
    """Bases of a stack of matrices ``(count, m, n)``, one pair per matrix: ``left``
    ``(count, m, m)`` and ``right`` ``(count, n, n)``, ``None`` for the identity. SOAP uses them
    for parameters seen as several matrices (``"split:K"``, ``"batch"`` views)."""

    left: Tensor | None
    right: Tensor | None


Bases = Sequence[Tensor | None] | MatrixBases


def project(x: Tensor, bases: Bases) -> Tensor:
    """Into the eigenbasis: ``x ×_i Q_iᵀ`` (``None``: identity). Matrix: ``Q_Lᵀ x Q_R``.

    With :class:`MatrixBases`, ``x`` is ``(count, m, n)`` and every matrix is rotated by its own
    pair (a batched product)."""
    if isinstance(bases, MatrixBases):
        if bases.left is not None:
            x = bases.left.mT @ x
        return x if bases.right is None else x @ bases.right
    if _plain_matrix(x, bases):
        return _matrix_project(x, bases[0], bases[1], transpose=True)
    return mode_product(x, bases, transpose=True)


def project_back(x: Tensor, bases: Bases) -> Tensor:
    """Out of the eigenbasis: ``x ×_i Q_i``. Matrix: ``Q_L x Q_Rᵀ``."""
    if isinstance(bases, MatrixBases):
        if bases.left is not None:
            x = bases.left @ x
        return x if bases.right is None else x @ bases.right.mT
    if _plain_matrix(x, bases):
        return _matrix_project(x, bases[0], bases[1], transpose=False)
    return mode_product(x, bases)


def _plain_matrix(x: Tensor, bases: Sequence[Tensor | None]) -> bool:
    """A 2-D ``x`` with a square basis (or ``None``) per side: the common case, done with plain
    matrix products (:func:`_matrix_project`)."""
    return x.dim() == 2 and len(bases) == 2 and all(Q is None or Q.dim() == 2 for Q in bases)


def _matrix_project(
    x: Tensor, left: Tensor | None, right: Tensor | None, transpose: bool
) -> Tensor:
    """``Q_Lᵀ x Q_R`` (``transpose``) or ``Q_L x Q_Rᵀ`` for ``x`` ``(m, n)``, bases ``(m, m)``,
    ``(n, n)`` or ``None``: the products :func:`mode_product` forms, without the copies of its
    general path (``tensordot`` of permuted operands): a 256x256 rotation 0.49 -> 0.45 ms, 256x64
    0.10 -> 0.075 ms on one CPU thread. Equal to it up to the rounding of the products (bit for
    bit with MKL on the AMX Xeon; tests/test_soap.py bounds both by Higham's γ(k)). The result is
    a new tensor unless both bases are ``None`` (then ``x`` itself, as :func:`mode_product`)."""
    if left is not None:
        x = (left.mT if transpose else left) @ x
    if right is not None:
        x = x @ (right if transpose else right.mT)
    return x


def matrix_factor(x: Tensor, side: int) -> Tensor:
    """The factor of each matrix of a stack ``x`` ``(count, m, n)``: ``x xᵀ`` ``(count, m, m)``
    for ``side`` 1 (rows, "L"), ``xᵀ x`` ``(count, n, n)`` for ``side`` 2 (columns, "R")."""
    return x @ x.mT if side == 1 else x.mT @ x


def soap_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    bases: Bases,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int | Tensor,
    ok: Tensor | None = None,
) -> Tensor:
    """Update both moments in place and return the direction ``N`` (module docstring).

    ``grad`` (original space), ``exp_avg`` and ``exp_avg_sq`` (both rotated space: ``m'``,
    ``v'``) share one shape (``(count, m, n)`` with :class:`MatrixBases`); ``step`` is
    the 1-based count of Adam updates including this one (a host int, or a 0-d tensor for a
    sync-free step); with ``ok`` (a 0-d bool tensor) the moments change only where it is true.
    Bias correction and ``eps`` are placed as in ``torch.optim.AdamW``, so with identity bases the
    result is its step. Products with the bases: two into the eigenbasis (the gradient) and two
    out of it (the direction) for a matrix.

    Moments stored in another dtype than ``grad``'s (``state_dtype``, e.g. bf16 beside a float32
    gradient) are read widened (:func:`~guided_descent.transforms.state_dtype.compute_dtype`),
    advanced there by the same operations as the float32 path's masked branch, rounded into their
    buffers once, and the direction is computed from the unrounded values.
    """
    rotated_grad = project(grad, bases)
    stored_apart = exp_avg.dtype != rotated_grad.dtype or exp_avg_sq.dtype != rotated_grad.dtype
    if ok is None and not stored_apart:
        exp_avg.lerp_(rotated_grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(rotated_grad, rotated_grad, value=1.0 - beta2)
        m, v = exp_avg, exp_avg_sq
    else:
        # Out of place, kept only where ok; a moment stored apart (state_dtype) is read widened
        # ((..) float32 from bf16 state; ``.to`` is the buffer itself when nothing is apart) and
        # rounded into its buffer once, by commit_. The same kernels as the in-place branch.
        dtype = widest(exp_avg, exp_avg_sq, rotated_grad)
        rotated_grad = rotated_grad.to(dtype)
        m = exp_avg.to(dtype).lerp(rotated_grad, 1.0 - beta1)
        v = exp_avg_sq.to(dtype).mul(beta2).addcmul_(rotated_grad, rotated_grad, value=1.0 - beta2)
        commit_(exp_avg, m, ok)
        commit_(exp_avg_sq, v, ok)
    denom = v.sqrt().div_(bias_correction(beta2, step) ** 0.5).add_(eps)
    # Out of place: m may be the state itself. The same two roundings as AdamW's m / bc1 / denom.
    rotated = (m / bias_correction(beta1, step)).div_(denom)
    return project_back(rotated, bases)


def rebase(x: Tensor, dim: int, old: Tensor, new: Tensor) -> Tensor:
    """``x ×_dim (newᵀ old)``: coordinates along dimension ``dim`` in the basis ``old``
    ``(n, n)`` carried to the basis ``new`` ``(n, n)`` -- back to the original space with ``old``,
    then into ``new`` (two products with ``x``; exact for orthogonal bases, whatever the order of
    ``new``'s columns, so a refresh's re-ordering needs nothing more). ``x`` is a tensor of any
    order with ``x.shape[dim] == n``; the result is a new tensor of its shape, in the wider of
    its and the bases' dtypes: a moment stored narrower (``state_dtype``: bf16) is carried in the
    bases' float32, for the caller to round once into its buffer. SOAP carries its rotated first
    moment to each refreshed basis with it."""
    x = x.to(widest(x, old, new))  # (.., n, ..) float32 from a bf16 moment; else x itself
    back: list[Tensor | None] = [None] * x.dim()
    into: list[Tensor | None] = [None] * x.dim()
    back[dim], into[dim] = old, new
    return project(project_back(x, back), into)


def tiebroken(F: Tensor, tiebreak: float) -> Tensor:
    """``F + tiebreak · λ_max · D`` with ``D = diag(1, ..., 0)`` (evenly spaced): the matrix whose
    eigenvectors :func:`initial_bases` takes (``F`` itself for ``tiebreak = 0``).

    A factor built from a few gradients is rank-deficient, and inside its null space (or any
    cluster of eigenvalues closer than rounding) ``eigh`` returns an arbitrary basis, different on
    another CPU or after a perturbation of 1e-7. SOAP runs Adam per coordinate of that basis, so
    the arbitrary choice decided the step (relative changes of 40 % after ten steps, measured).
    ``D`` breaks those ties the same way every time: directions the factor does not separate by
    more than ``tiebreak · λ_max`` are ordered along the coordinate axes, i.e. stay close to
    Adam's own coordinates; well-separated eigen-directions move by ``O(tiebreak)``. ``λ_max`` is
    bounded by the Frobenius norm (within ``sqrt(rank)``), cheaper than an extra decomposition.
    """
    if tiebreak == 0.0:
        return F
    n = F.shape[-1]
    scale = torch.linalg.matrix_norm(F).unsqueeze(-1)  # (..., 1): ‖F‖_F >= λ_max
    ramp = torch.linspace(1.0, 0.0, n, dtype=F.dtype, device=F.device)
    return F + torch.diag_embed(tiebreak * scale * ramp)


def initial_bases(factors: Sequence[Tensor], tiebreak: float = 0.0) -> list[Tensor | None]:
    """Full eigenbases of the ``(n, n)`` factors (of :func:`tiebroken` ones when ``tiebreak >
    0``), batched by size; ``None`` where eigh failed."""
    out: list[Tensor | None] = [None] * len(factors)
    for idx in size_buckets(factors).values():
        try:
            batch = eigenbasis(tiebroken(torch.stack([factors[i] for i in idx]), tiebreak))
        except MatrixFunctionError:
            if len(idx) == 1:
                continue
            for i in idx:  # isolate the bad factor(s)
                try:
                    out[i] = eigenbasis(tiebroken(factors[i], tiebreak))
                except MatrixFunctionError:
                    pass
            continue
        for j, i in enumerate(idx):
            out[i] = batch[j].clone()  # its own storage, not a view kept alive in state
    return out


class BasisRefresh(NamedTuple):
    """One factor's refresh: :class:`~guided_descent.linalg.eigenbasis.EigenbasisRefresh`'s
    ``basis``, ``order`` and ``ok``, plus ``condition``, a 0-d estimate of the factor's condition
    number from the Rayleigh quotients the refresh computes anyway (exact once the basis has
    converged to the eigenvectors)."""

    basis: Tensor
    order: Tensor
    ok: Tensor
    condition: Tensor


def refresh_bases(
    factors: Sequence[Tensor], bases: Sequence[Tensor], shift: float = 0.0, sort: bool = True
) -> list[BasisRefresh]:
    """One :func:`refresh_eigenbasis` step per (factor, basis) pair, batched by size.

    ``shift``: the power step works on ``F + shift · (tr F / n) · I``, which has the same
    eigenvectors. Where ``F`` has no signal (its null space) ``F Q`` is rounding noise, and QR
    would normalize that noise into new, arbitrary basis vectors at every refresh; with the shift,
    those columns keep their previous directions instead. Convergence of the others slows only by
    the ratio ``(λ_i + s) / (λ_j + s)``. The condition estimates are those of ``F`` itself.
    ``sort=False``: the unsorted power step (see :func:`refresh_eigenbasis`).
    """
    if len(factors) != len(bases):
        raise ValueError(f"refresh_bases: {len(factors)} factors but {len(bases)} bases")
    out: dict[int, BasisRefresh] = {}
    for idx in size_buckets(factors).values():
        stack = torch.stack([factors[i] for i in idx])  # (b, n, n)
        amount = None
        if shift:
            n = stack.shape[-1]
            amount = shift * stack.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / n  # (b, 1)
            stack = stack + torch.diag_embed(amount.expand(-1, n))
        result, estimates = refresh_eigenbasis(
            stack,
            torch.stack([bases[i] for i in idx]),
            return_estimates=True,
            sort=sort,
        )
        if amount is not None:
            estimates = estimates - amount
        conditions = condition_number(estimates)  # (len(idx),)
        for j, i in enumerate(idx):
            out[i] = BasisRefresh(
                result.basis[j].clone(), result.order[j], result.ok[j], conditions[j]
            )
    return [out[i] for i in range(len(factors))]


def permute_rotated_(exp_avg_sq: Tensor, dim: int, order: Tensor) -> None:
    """Re-index dimension ``dim`` of the rotated second moment after its basis was re-ordered.

    In the buffer's own dtype: a permutation moves values without rounding them, so a bf16
    (``state_dtype``) moment permuted as it is equals it widened, permuted and rounded back."""
    exp_avg_sq.copy_(exp_avg_sq.index_select(dim, order))
