"""Shampoo's preconditioner as free functions: blocking plan, factor statistics, inverse roots.

Shampoo (Gupta, Koren & Singer 2018, arXiv 1802.09568) preconditions an order-``k`` gradient
tensor ``G`` with one factor per dimension (:mod:`guided_descent.preconditioners.kronecker`)::

    F_i = beta2 * F_i + (1 - beta2) * G_(i) G_(i)ᵀ                 every step
    P_i = (F_i / (1 - beta2^t) + epsilon * I)^(-1/(2k))            every precondition_frequency
    D   = M ×_0 P_0 ×_1 P_1 ... ×_{k-1} P_{k-1}                    (a matrix: D = P_L M P_R)

where ``M`` is the (bias-corrected) first moment of the gradient. This module decides, per
parameter, how that is done (Anil et al. 2020, arXiv 2002.09018, section 4):

* **Blocking.** A dimension longer than ``max_preconditioner_dim`` is cut into chunks of at most
  that length; every block of the resulting grid is preconditioned on its own, exactly as a
  separate parameter of the block's shape would be. Factors stay at most
  ``max_preconditioner_dim`` square, so the cubic cost of an inverse root stays bounded.
* **Diagonal dimensions.** A dimension longer than ``max_factor_dim`` (an embedding's vocabulary,
  say) is not cut but gets a *diagonal* factor ``diag(F_i)``: a few blocks of a vocabulary would
  still be too many and too large. It still counts in ``k``.
* **Trivial dimensions** (length 1) are dropped: a ``(1, n)`` matrix is an ``n``-vector.
* **Diagonal fallback.** A block with fewer than two non-trivial dimensions (a vector, a scalar)
  or without any dense factor gets no Kronecker preconditioner at all; it takes the grafted
  diagonal method's update (Adam or AdaGrad, :mod:`guided_descent.transforms.grafting`), which is
  at least as good as a product of diagonal factors.

Inverse roots of all blocks of one size (and root) are computed in one batched ``eigh`` call
(:func:`inverse_roots`); where a batch fails, its members are retried one by one so that a single
bad factor cannot spoil the others, and the failures are reported as ``None``. Each root comes with
the condition number of the damped factor, read off the eigenvalues the root was computed from.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from guided_descent.linalg.matrix_functions import (
    MatrixFunctionError,
    condition_number,
    damping,
    inverse_root,
)
from guided_descent.preconditioners.kronecker import (
    diagonal_factor,
    kronecker_factor,
    mode_product,
    size_buckets,
)
from guided_descent.preconditioners.views import FLATTEN, block_lengths
from guided_descent.transforms.grafting import graft
from guided_descent.transforms.masking import commit_

FactorKind = Literal["full", "diagonal", "skip"]
FULL: FactorKind = "full"
DIAGONAL: FactorKind = "diagonal"
SKIP: FactorKind = "skip"


@dataclass(frozen=True)
class BlockPlan:
    """One block of a parameter: where it sits and which factor each of its dimensions gets."""

    index: tuple[slice, ...]  # the block is param[index]
    shape: tuple[int, ...]
    kinds: tuple[FactorKind, ...]  # per dimension

    @property
    def order(self) -> int:
        """``k``: the number of dimensions that carry a factor (dense or diagonal)."""
        return sum(kind != SKIP for kind in self.kinds)

    @property
    def root(self) -> int:
        """``2k``: every factor is raised to ``-1/(2k)``."""
        return 2 * self.order

    @property
    def preconditioned(self) -> bool:
        """Whether the block gets a Kronecker preconditioner (else: the diagonal fallback)."""
        return self.order >= 2 and FULL in self.kinds


@dataclass(frozen=True)
class ShampooLayout:
    """How one parameter is cut into blocks (row-major over the block grid)."""

    shape: tuple[int, ...]
    blocks: tuple[BlockPlan, ...]

    @property
    def preconditioned(self) -> bool:
        return any(block.preconditioned for block in self.blocks)


def dimension_kinds(shape: Sequence[int], max_factor_dim: int) -> tuple[FactorKind, ...]:
    """The factor each dimension of a block of ``shape`` gets (see the module docstring)."""
    kinds: list[FactorKind] = []
    for n in shape:
        if n == 1:
            kinds.append(SKIP)
        elif n > max_factor_dim:
            kinds.append(DIAGONAL)
        else:
            kinds.append(FULL)
    return tuple(kinds)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _cuts(n: int, piece: int, size: int) -> list[slice]:
    """Chunks of ``range(n)``: first pieces of length ``piece`` (a view's matrices), then each
    piece in chunks of at most ``size`` -- so that no chunk straddles two pieces."""
    return [
        slice(start + s.start, start + s.stop)
        for start in range(0, n, piece)
        for s in _chunks(min(piece, n - start), size)
    ]


# Layouts depend on the shape and limits only. A plain dict rather than functools.lru_cache:
# torch.compile traces through a dict lookup but warns about (and bypasses) an lru_cache.
_LAYOUTS: dict[tuple[tuple[int, ...], int, int, str], ShampooLayout] = {}


def shampoo_layout(
    shape: tuple[int, ...],
    max_preconditioner_dim: int,
    max_factor_dim: int,
    view: str = FLATTEN,
) -> ShampooLayout:
    """The blocks of a parameter of ``shape`` (cached: it depends on the shape and limits only).

    ``view`` (:mod:`guided_descent.preconditioners.views`): ``"flatten"`` blocks the parameter as
    the tensor it is; ``"split:K"`` and ``"batch"`` first cut it into the view's matrices, so that
    each matrix (Q, K, V; a gate; an expert) gets preconditioners of its own.
    """
    key = (tuple(shape), max_preconditioner_dim, max_factor_dim, view)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = _layout(*key)
    return layout


def _layout(
    shape: tuple[int, ...], max_preconditioner_dim: int, max_factor_dim: int, view: str
) -> ShampooLayout:
    if max_preconditioner_dim < 1 or max_factor_dim < 1:
        raise ValueError(
            f"max_preconditioner_dim and max_factor_dim must be >= 1, got "
            f"{max_preconditioner_dim!r} and {max_factor_dim!r}"
        )
    pieces = block_lengths(shape, view) if len(shape) >= 2 else tuple(shape)
    # Only dimensions that get a dense factor are cut by size; a diagonal factor has no size
    # problem (but a view's pieces still separate its matrices).
    per_dim = [
        _cuts(n, piece, max_preconditioner_dim if 1 < n <= max_factor_dim else max(n, 1))
        for n, piece in zip(shape, pieces, strict=True)
    ]
    blocks = []
    for index in itertools.product(*per_dim):
        block_shape = tuple(s.stop - s.start for s in index)
        blocks.append(BlockPlan(index, block_shape, dimension_kinds(block_shape, max_factor_dim)))
    return ShampooLayout(tuple(shape), tuple(blocks))


def new_factors(block: BlockPlan, dtype: torch.dtype, device: torch.device) -> list[Tensor | None]:
    """Zero statistics for a preconditioned block: ``(n, n)`` per dense, ``(n,)`` per diagonal."""
    factors: list[Tensor | None] = []
    for n, kind in zip(block.shape, block.kinds, strict=True):
        if kind == FULL:
            factors.append(torch.zeros(n, n, dtype=dtype, device=device))
        elif kind == DIAGONAL:
            factors.append(torch.zeros(n, dtype=dtype, device=device))
        else:
            factors.append(None)
    return factors


def identity_roots(factors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The preconditioner before the first root is computed: identity on every side."""
    roots: list[Tensor | None] = []
    for F in factors:
        if F is None:
            roots.append(None)
        elif F.dim() == 2:
            roots.append(torch.eye(F.shape[0], dtype=F.dtype, device=F.device))
        else:
            roots.append(torch.ones_like(F))
    return roots


def accumulate_factors_(
    factors: Sequence[Tensor | None], block: Tensor, beta2: float, ok: Tensor | None = None
) -> None:
    """``F_i = beta2 F_i + (1 - beta2) G_(i) G_(i)ᵀ`` in place (its diagonal for 1-D ``F_i``).

    ``block`` must already be in the factors' dtype (float32: see ``kronecker.compute_dtype``).
    With ``ok`` (a 0-d bool tensor) each factor changes only where it is true.
    """
    for dim, F in enumerate(factors):
        if F is None:
            continue
        new = kronecker_factor(block, dim) if F.dim() == 2 else diagonal_factor(block, dim)
        if ok is None:
            F.lerp_(new, 1.0 - beta2)
        else:
            commit_(F, F.lerp(new, 1.0 - beta2), ok)


class InverseRoot(NamedTuple):
    """A factor's inverse root and the condition number of the damped factor it was taken of.

    ``condition`` is a 0-d tensor (no host sync when computed; see
    :func:`guided_descent.linalg.matrix_functions.condition_number`).
    """

    root: Tensor
    condition: Tensor


def diagonal_inverse_root(
    d: Tensor, root: int, epsilon: float, relative_epsilon: float = 0.0
) -> Tensor:
    """``(max(d, 0) + ε)^(-1/root)`` for a diagonal factor, ``ε = epsilon + relative_epsilon ·
    max(d)``; raises on a non-finite result."""
    out = (d.clamp_min(0.0) + damping(d, epsilon, relative_eps=relative_epsilon)).pow(-1.0 / root)
    if not torch.isfinite(out).all():
        raise MatrixFunctionError("diagonal factor holds NaN/Inf or epsilon is 0")
    return out


def _one_root(
    F: Tensor, root: int, epsilon: float, relative_epsilon: float = 0.0
) -> InverseRoot | None:
    try:
        if F.dim() == 1:
            damped = F.clamp_min(0.0) + damping(F, epsilon, relative_eps=relative_epsilon)
            P = diagonal_inverse_root(F, root, epsilon, relative_epsilon)
            return InverseRoot(P, condition_number(damped))
        P, spectrum = inverse_root(
            F, root, epsilon, relative_eps=relative_epsilon, return_eigenvalues=True
        )
        return InverseRoot(P, condition_number(spectrum))
    except MatrixFunctionError:
        return None


def inverse_roots(
    factors: Sequence[Tensor],
    roots: Sequence[int],
    epsilon: float,
    relative_epsilon: float = 0.0,
) -> list[InverseRoot | None]:
    """``(F + ε I)^(-1/root)`` for every factor, ``ε = epsilon + relative_epsilon · λ_max(F)``;
    ``None`` where it could not be computed.

    Dense factors of one shape, dtype, device and root share one batched
    :func:`~guided_descent.linalg.matrix_functions.inverse_root` call; if that call fails, its
    members are retried alone. Diagonal (1-D) factors are raised elementwise.
    """
    if len(factors) != len(roots):
        raise ValueError(f"inverse_roots: {len(factors)} factors but {len(roots)} roots")
    out: list[InverseRoot | None] = [None] * len(factors)
    dense = [i for i, F in enumerate(factors) if F.dim() == 2]
    for i, F in enumerate(factors):
        if F.dim() == 1:
            out[i] = _one_root(F, roots[i], epsilon, relative_epsilon)
    by_root: dict[int, list[int]] = {}
    for i in dense:
        by_root.setdefault(roots[i], []).append(i)
    for root, members in by_root.items():
        buckets = size_buckets([factors[i] for i in members])
        for positions in buckets.values():
            idx = [members[j] for j in positions]
            if len(idx) == 1:
                out[idx[0]] = _one_root(factors[idx[0]], root, epsilon, relative_epsilon)
                continue
            try:
                batch, spectra = inverse_root(
                    torch.stack([factors[i] for i in idx]),
                    root,
                    epsilon,
                    relative_eps=relative_epsilon,
                    return_eigenvalues=True,
                )
            except MatrixFunctionError:
                for i in idx:
                    out[i] = _one_root(factors[i], root, epsilon, relative_epsilon)
                continue
            conditions = condition_number(spectra)  # (len(idx),)
            for j, i in enumerate(idx):
                # Own storage, not views that would keep the whole batch alive in state.
                out[i] = InverseRoot(batch[j].clone(), conditions[j].clone())
    return out


def precondition_block(block: Tensor, roots: Sequence[Tensor | None]) -> Tensor:
    """``block ×_0 P_0 ×_1 P_1 ...``: Shampoo's direction for one block (``None``: identity)."""
    return mode_product(block, roots)


def block_direction(
    block: Tensor, roots: Sequence[Tensor | None], magnitude: Tensor | None
) -> Tensor:
    """Shampoo's update of one block: :func:`precondition_block`, grafted to the Frobenius norm
    of ``magnitude`` (the same block of the diagonal method's step) unless it is ``None``."""
    direction = precondition_block(block, roots)
    return direction if magnitude is None else graft(direction, magnitude)
