"""Which rank does which piece of preconditioner work: cost estimates and a balanced assignment.

Everything here is a pure function of shapes and numbers, so an assignment can be computed,
inspected and tested on one process. Every rank calls :func:`assign` with the same costs and gets
the same owners without communicating: that is what lets each rank compute only its share and
still know who will send it every other result.

**Costs** are floating-point operation counts of the dominant dense kernels. Only their ratios
matter (they decide which rank gets which matrix), so constant factors that are the same for every
matrix of a kind are kept only where two kinds are mixed in one assignment (K-FAC's ``A`` and
``S`` eigendecompositions of one layer).

**Assignment** is greedy longest-processing-time (LPT, Graham 1969): the items sorted by cost,
largest first, each given to the rank with the smallest load so far. Its makespan is at most
``4/3 - 1/(3N)`` times the optimum; for the typical transformer (many matrices of a few shapes) it
is within a few per cent of perfect balance. Ties break by item index and by rank, so the result
is deterministic.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass


def newton_schulz_flops(m: int, n: int, steps: int) -> float:
    """FLOPs of ``steps`` quintic Newton–Schulz iterations on one ``(m, n)`` matrix.

    With ``a = min(m, n)``, ``b = max(m, n)`` (the iteration works on the short side's Gram
    matrix), each step is ``A = X Xᵀ`` (``2a²b``), ``bA + cA²`` (``2a³``) and ``(bA + cA²) X``
    (``2a²b``): ``4a²b + 2a³``; five steps give the ``20m²n + 10m³`` of the benchmark spec.
    """
    a, b = min(m, n), max(m, n)
    return float(steps) * (4.0 * a * a * b + 2.0 * a**3)


def eigh_flops(n: int) -> float:
    """FLOPs of a symmetric eigendecomposition with eigenvectors, ``(n, n)``: about ``9n³``
    (Householder tridiagonalization ``4n³/3``, implicit QR on the tridiagonal matrix with vector
    accumulation ``~6n³``, back-transformation ``~2n³``; Golub & Van Loan, table 8.3.1)."""
    return 9.0 * float(n) ** 3


def inverse_root_flops(n: int) -> float:
    """FLOPs of ``(F + εI)^(-1/p)`` by eigendecomposition: the ``eigh`` plus ``V diag(d) Vᵀ``."""
    return eigh_flops(n) + 2.0 * float(n) ** 3


def qr_refresh_flops(n: int) -> float:
    """FLOPs of SOAP's basis refresh ``Q ← qr(P Q)``: the product ``2n³``, Householder QR
    ``4n³/3`` and forming ``Q`` ``4n³/3``."""
    return (2.0 + 8.0 / 3.0) * float(n) ** 3


def diagonal_root_flops(n: int) -> float:
    """A diagonal factor's inverse root is elementwise: ``n`` operations."""
    return float(n)


@dataclass(frozen=True)
class Assignment:
    """The owner (rank) of every item and the total cost each rank was given."""

    owners: tuple[int, ...]
    loads: tuple[float, ...]

    @property
    def world_size(self) -> int:
        return len(self.loads)

    def owned(self, rank: int) -> tuple[int, ...]:
        """Indices of the items ``rank`` computes, ascending."""
        return tuple(i for i, owner in enumerate(self.owners) if owner == rank)

    @property
    def imbalance(self) -> float:
        """Largest load over the mean load (1.0 is perfect balance; 1.0 when there is no work)."""
        total = sum(self.loads)
        if total == 0.0:
            return 1.0
        return max(self.loads) * len(self.loads) / total


def _check_costs(costs: Sequence[float]) -> None:
    for i, cost in enumerate(costs):
        if isinstance(cost, bool) or not isinstance(cost, (int, float)):
            raise ValueError(f"assign: costs[{i}] must be a number, got {cost!r}")
        if not (math.isfinite(cost) and cost >= 0.0):
            raise ValueError(f"assign: costs[{i}] must be finite and >= 0, got {cost!r}")


def assign(costs: Sequence[float], world_size: int) -> Assignment:
    """Give every item to a rank so that the largest per-rank cost is small (greedy LPT).

    ``costs[i]`` is item ``i``'s estimated cost (e.g. :func:`newton_schulz_flops`); the result is
    the same on every rank for the same inputs. Raises ``ValueError`` for a ``world_size`` below 1
    or a negative or non-finite cost.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign: world_size must be an integer >= 1, got {world_size!r}")
    costs = tuple(costs)
    _check_costs(costs)
    return _assign(tuple(float(c) for c in costs), world_size)


@functools.lru_cache(maxsize=512)
def _assign(costs: tuple[float, ...], world_size: int) -> Assignment:
    # Cached: an optimizer asks for the same assignment every step (same shapes, same costs).
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, rank) for rank in range(world_size)]  # (load, rank): ties go to the lower rank
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    loads = [0.0] * world_size
    for i, rank in enumerate(owners):
        loads[rank] += costs[i]
    return Assignment(tuple(owners), tuple(loads))
