"""Worst-case rounding bounds for tests that compare two floating-point computations.

Two computations of the same exact quantity by different kernels (batched vs single, another
CPU's BLAS, another summation order) may differ by up to twice a bound on either one's rounding
error. Such a bound, derived from the standard model fl(a op b) = (a op b)(1 + δ), |δ| <= u, holds
on every machine, unlike a tolerance read off one machine's run.

Import from a test as ``from float_rounding import newton_schulz_rounding_bound`` (pytest puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import functools
import math

import torch


def _composed(x: torch.Tensor, schedule) -> torch.Tensor:
    for a, b, c in schedule:
        x = a * x + b * x**3 + c * x**5
    return x


def slope_sup(schedule, hi: float) -> float:
    """sup of |F'| on [0, hi] for the composition F of ``schedule`` (1 for an empty schedule).

    The chain rule on a grid of 100 001 points in float64; the 5 % margin covers the grid's gaps
    (F' is a polynomial of degree <= 5⁵ whose steepest part, near 0, is smooth on this grid).
    """
    x = torch.linspace(0.0, hi, 100_001, dtype=torch.float64)
    slope = torch.ones_like(x)
    for a, b, c in schedule:
        slope = slope * (a + 3 * b * x**2 + 5 * c * x**4)
        x = a * x + b * x**3 + c * x**5
    return 1.05 * slope.abs().max().item()


@functools.cache
def newton_schulz_rounding_bound(m: int, n: int, schedule: tuple, dtype: torch.dtype) -> float:
    """A worst-case bound on ‖newton_schulz(G) - U F(Σ/‖G‖_F) Vᵀ‖_F when computed in ``dtype``.

    ``schedule`` is the tuple of ``(a, b, c)`` triples, one per step (hashable: results are
    cached); ``G`` is ``(..., m, n)``. Typical values for Jordan's 5 steps: float32 3.8e-3
    (3x3), 2.7e-2 (12x12), 0.11 (48x24); float64 7e-12, 5e-11, 2e-10.

    Derived from the rounding model alone, so it holds for every summation order, blocking, FMA
    use and thread count -- any CPU and BLAS -- to first order in the unit roundoff
    u = eps/2. A matrix product with inner dimension k errs elementwise by at most
    γ(k) |A| |B|, γ(k) = k u / (1 - k u) (Higham, Accuracy and Stability of Numerical
    Algorithms, §3.5), hence by γ(k) ‖A‖_F ‖B‖_F in Frobenius norm; a fused addmm adds 3 more
    roundings (the two scalings and the sum). With r = min(m, n), N = max(m, n), X (r, N):

    * normalization: the norm of mn squares, a square root and a division: each entry of X₀ is
      off by a relative γ(mn + 3), so ‖E₀‖_F <= γ(mn + 3) ‖X₀‖_F = γ(mn + 3);
    * one step from an exact X (‖X‖₂ <= s, ‖X‖_F <= f): A = X Xᵀ errs by γ(N) f²; B = b A + c A²
      by (|b| + 2|c| s²) that error plus γ(r + 3)(|b| s f + |c| s² f²); X' = a X + B X by
      s times B's error plus γ(r + 3)(|a| f + ‖B‖_F f), ‖B‖_F <= (|b| + |c| s²) s f.
    * the error made in step k travels through the remaining steps, whose map on singular values
      R has Frobenius-norm Lipschitz constant sup |R'| (its divided differences and R(x)/x are
      slopes of R, by the mean value theorem), taken over the singular values' range [0, s_k].

    s and f are tracked in float64: s' = max |p| on [0, s], f' <= min(s' √r, f · max |p(x)/x|).
    The bound is far above typical errors (it assumes every rounding lands in the most amplified
    direction) but it is a bound: two computations of the same matrix differ by at most twice it.
    """
    u = torch.finfo(dtype).eps / 2

    def gamma(k: int) -> float:
        return k * u / (1 - k * u)

    r, N = min(m, n), max(m, n)
    total = gamma(m * n + 3) * slope_sup(schedule, 1.0)
    s, f = 1.0, 1.0
    grid = torch.linspace(0.0, 1.0, 100_001, dtype=torch.float64)[1:]
    for k, (a, b, c) in enumerate(schedule):
        a, b, c = abs(a), abs(b), abs(c)
        err_A = gamma(N) * f * f
        err_B = (b + 2 * c * s * s) * err_A + gamma(r + 3) * (b * s * f + c * s * s * f * f)
        norm_B = (b + c * s * s) * s * f
        err_X = s * err_B + gamma(r + 3) * (a * f + norm_B * f)
        x = s * grid
        p = _composed(x, [schedule[k]]).abs()
        s, f = p.max().item(), min(p.max().item() * math.sqrt(r), f * (p / x).max().item())
        # Computed iterates stray from the exact ones by ~the bound itself: 0.1 % headroom.
        total += err_X * slope_sup(schedule[k + 1 :], 1.001 * s)
    return total
