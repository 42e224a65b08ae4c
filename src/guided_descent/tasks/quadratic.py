"""A rotated ill-conditioned quadratic, ``f(θ) = ½ θᵀAθ``, and the tuned constants of each method.

The pieces the ``quadratic`` experiment composes:

* :func:`spectrum` -- the eigenvalues ``λ``: ``dim`` values log-spaced from ``1/κ`` to ``1``, so
  ``L = λ_max = 1``, ``μ = λ_min = 1/κ`` and the condition number is exactly ``κ``;
* :func:`haar_orthogonal` -- a Haar-distributed (uniformly random) rotation ``Q``;
* :func:`make_problem` -- ``A = Q diag(λ) Qᵀ`` and a standard normal starting point, both seeded;
* :func:`gradient`, :func:`newton_step`, :func:`relative_error` -- ``∇f(θ) = Aθ``,
  ``θ - A⁻¹∇f(θ)`` and ``‖θ - θ⋆‖ / ‖θ₀ - θ⋆‖``; the minimiser is ``θ⋆ = 0``;
* :func:`gd_constants`, :func:`heavy_ball_constants`, :func:`nesterov_constants` -- the step
  size and momentum that give each method its best worst-case rate on a quadratic with
  ``μ I ⪯ A ⪯ L I``.

Everything is float64: a relative error of 1e-6 at ``κ = 10⁴`` is far above float64 round-off
(≈ κ·1e-16) but would sit at the edge of what float32 can resolve. Functions accept a leading
batch dimension: ``A`` of shape ``(..., d, d)`` with ``θ`` of shape ``(..., d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64


def _check_kappa(kappa: float) -> None:
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"kappa must be a number, got {kappa!r}")
    if not math.isfinite(kappa) or kappa < 1:
        raise ValueError(f"kappa must be a finite number >= 1, got {kappa!r}")


def spectrum(kappa: float, dim: int) -> Tensor:
    """Eigenvalues ``λ_i = κ^{-1 + (i-1)/(dim-1)}``, i = 1..dim: log-spaced in ``[1/κ, 1]``.

    Returns a ``(dim,)`` float64 tensor in increasing order; its ends are exactly ``1/κ`` and 1.
    """
    _check_kappa(kappa)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    lam = torch.logspace(-math.log10(kappa), 0.0, dim, dtype=DTYPE)
    # logspace goes through 10**x: pin the ends so that L = 1 and μ = 1/κ hold to the last bit.
    lam[0], lam[-1] = 1.0 / kappa, 1.0
    return lam


def haar_orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """A ``(dim, dim)`` float64 orthogonal matrix drawn from the Haar measure.

    QR of a standard Gaussian matrix, with the signs of ``R``'s diagonal moved into ``Q``:
    without that correction ``Q`` depends on the QR routine's sign convention and is not uniform
    (Mezzadri 2007, arXiv math-ph/0609050).
    """
    z = torch.randn(dim, dim, generator=generator, dtype=DTYPE)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r))


@dataclass(frozen=True)
class Quadratic:
    """One problem ``f(θ) = ½ θᵀAθ``: ``A = Q diag(λ) Qᵀ`` (``(d, d)`` float64), its ``λ``
    (``(d,)``, increasing), the rotation ``Q`` and the start ``θ₀`` (``(d,)``)."""

    kappa: float
    hessian: Tensor
    eigenvalues: Tensor
    rotation: Tensor
    theta0: Tensor

    @property
    def L(self) -> float:
        """Largest eigenvalue (smoothness constant)."""
        return float(self.eigenvalues[-1])

    @property
    def mu(self) -> float:
        """Smallest eigenvalue (strong-convexity constant)."""
        return float(self.eigenvalues[0])


def make_problem(kappa: float, dim: int, seed: int) -> Quadratic:
    """The problem for ``(κ, seed)``: ``Q`` Haar-random and ``θ₀ ~ N(0, I)``, both from ``seed``.

    The seed alone fixes ``Q`` and ``θ₀``, so one seed's problems at different ``κ`` differ only
    in their spectrum: a curve of iterations against ``κ`` then compares like with like.
    """
    generator = torch.Generator().manual_seed(seed)
    lam = spectrum(kappa, dim)
    q = haar_orthogonal(dim, generator)
    theta0 = torch.randn(dim, generator=generator, dtype=DTYPE)
    a = (q * lam) @ q.T  # Q diag(λ) Qᵀ without forming diag(λ)
    a = 0.5 * (a + a.T)  # exactly symmetric, so that solves and eigh see a symmetric matrix
    return Quadratic(float(kappa), a, lam, q, theta0)


def loss(hessian: Tensor, theta: Tensor) -> Tensor:
    """``f(θ) = ½ θᵀAθ`` (batched over leading dimensions)."""
    return 0.5 * (theta * gradient(hessian, theta)).sum(-1)


def gradient(hessian: Tensor, theta: Tensor) -> Tensor:
    """``∇f(θ) = Aθ``: ``(..., d, d)`` and ``(..., d)`` to ``(..., d)``."""
    # A batched matrix-vector product; matmul is about 10x faster here than the equivalent
    # einsum, which matters because this runs once per iteration in a Python loop.
    return torch.matmul(hessian, theta.unsqueeze(-1)).squeeze(-1)


def newton_step(hessian: Tensor, theta: Tensor) -> Tensor:
    """``θ - A⁻¹ ∇f(θ)`` by a dense solve (no explicit inverse).

    On a quadratic the Hessian is exact everywhere, so one step lands on ``θ⋆ = 0`` up to the
    solve's round-off, about ``κ · 1e-16`` relative in float64.
    """
    g = gradient(hessian, theta)
    return theta - torch.linalg.solve(hessian, g.unsqueeze(-1)).squeeze(-1)


def relative_error(theta: Tensor, theta0: Tensor) -> Tensor:
    """``‖θ - θ⋆‖ / ‖θ₀ - θ⋆‖`` with ``θ⋆ = 0``, over the last dimension."""
    return torch.linalg.vector_norm(theta, dim=-1) / torch.linalg.vector_norm(theta0, dim=-1)


def gd_constants(mu: float, L: float) -> dict[str, float]:
    """Gradient descent ``θ ← θ - η∇f(θ)`` with ``η = 1/L``.

    Every eigen-direction then contracts by ``1 - λ/L``, the slowest by ``1 - 1/κ`` per step:
    reaching a relative error ``ε`` takes about ``κ · ln(1/ε)`` steps. (``η = 2/(L+μ)`` would
    be slightly faster; ``1/L`` is the step the protocol names and the textbook default.)
    Returned under torch's names: ``{"lr": η}``.
    """
    _check_constants(mu, L)
    return {"lr": 1.0 / L}


def heavy_ball_constants(mu: float, L: float) -> dict[str, float]:
    """Polyak's heavy ball ``θ ← θ - η∇f(θ) + β(θ - θ_prev)`` with its optimal constants.

    ``η = 4 / (√L + √μ)²`` and ``β = ((√κ - 1)/(√κ + 1))²`` place every eigen-direction's pair of
    characteristic roots on the circle of radius ``√β = (√κ - 1)/(√κ + 1)``, so about
    ``(√κ/2) · ln(1/ε)`` steps reach ``ε`` (Polyak 1964). torch's ``SGD(momentum=β, lr=η)``
    (``v ← βv + g; θ ← θ - ηv``) is this recursion exactly. Returns ``{"lr": η, "momentum": β}``.
    """
    _check_constants(mu, L)
    sk = math.sqrt(L / mu)
    return {
        "lr": 4.0 / (math.sqrt(L) + math.sqrt(mu)) ** 2,
        "momentum": ((sk - 1.0) / (sk + 1.0)) ** 2,
    }


def nesterov_constants(mu: float, L: float) -> dict[str, float]:
    """Nesterov's accelerated gradient for a ``μ``-strongly convex, ``L``-smooth function.

    Look ahead ``y = θ + β(θ - θ_prev)``, then ``θ ← y - η∇f(y)``, with ``η = 1/L`` and
    ``β = (√κ - 1)/(√κ + 1)``: the error contracts by about ``1 - 1/√κ`` per step, so about
    ``√κ · ln(1/ε)`` steps reach ``ε`` (Nesterov 1983; 2004, §2.2). torch's
    ``SGD(nesterov=True)`` runs the same iteration on the look-ahead point (Sutskever et al.
    2013's form). Returns ``{"lr": η, "momentum": β}``.
    """
    _check_constants(mu, L)
    sk = math.sqrt(L / mu)
    return {"lr": 1.0 / L, "momentum": (sk - 1.0) / (sk + 1.0)}


def _check_constants(mu: float, L: float) -> None:
    if not (math.isfinite(mu) and math.isfinite(L) and 0.0 < mu <= L):
        raise ValueError(f"need 0 < mu <= L (finite), got mu={mu!r}, L={L!r}")


def gd_iterations(kappa: float, tol: float) -> int:
    """Steps GD with ``η = 1/L`` needs when ``θ₀`` lies along the slowest eigenvector.

    The error is then exactly ``(1 - 1/κ)^t``, so the count is ``⌈ln ε / ln(1 - 1/κ)⌉``; from a
    generic start it is a little smaller (the slowest direction holds only part of ``θ₀``).
    """
    _check_kappa(kappa)
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if kappa == 1:
        return 1
    return math.ceil(math.log(tol) / math.log1p(-1.0 / kappa))
