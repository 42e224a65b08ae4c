"""Kronecker-structured matrix regression: learn ``X`` in ``y = A X B v + noise``.

The ``kron-quadratic`` benchmark workload (BENCHMARKS.md). ``A`` and ``B`` are fixed,
ill-conditioned ``dim x dim`` matrices; each minibatch draws probe vectors ``v ~ N(0, I)`` and
noisy targets ``y = A X⋆ B v + σ ε``. The loss ``½ mean_v ‖A X B v − y‖²`` has the Hessian
``(B Bᵀ) ⊗ (Aᵀ A)``: a Kronecker product, so a Kronecker-factored preconditioner (K-FAC,
Shampoo, SOAP) can undo its conditioning, while a diagonal one (Adam) or none (SGD) cannot.

The model is a three-layer *linear* network whose outer layers hold ``B`` and ``A`` and are
frozen; only the middle weight ``X`` trains. Written this way every optimizer sees the same
single trainable matrix, and matrix methods route it as a hidden matrix (the frozen ``A`` layer
is the "head"), so nothing is special-cased.

Evaluation is exact, not sampled: the excess risk over the noise floor is
``½ ‖A (X − X⋆) B‖²_F`` (the expectation over ``v`` in closed form), reported relative to its
value at the initialisation ``X = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class KronProblem:
    """``a``, ``b``, ``x_star``: ``(dim, dim)`` float32; ``noise``: σ of the target noise."""

    a: Tensor
    b: Tensor
    x_star: Tensor
    noise: float

    @property
    def dim(self) -> int:
        return self.a.shape[0]

    def to(self, device: torch.device | str) -> KronProblem:
        return KronProblem(self.a.to(device), self.b.to(device), self.x_star.to(device), self.noise)


def _haar(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian with the signs of R's diagonal fixed."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def conditioned_matrix(dim: int, kappa: float, generator: torch.Generator) -> Tensor:
    """``U diag(s) Vᵀ`` with Haar ``U, V`` and singular values log-spaced from 1 down to 1/κ."""
    s = torch.logspace(0.0, -math.log10(kappa), dim, dtype=torch.float64)
    return _haar(dim, generator) @ torch.diag(s) @ _haar(dim, generator).T


def make_problem(
    dim: int = 64, kappa: float = 1e3, noise: float = 1e-3, seed: int = 0
) -> KronProblem:
    """A problem drawn from ``seed``: ``A``, ``B`` of condition number ``kappa``; ``X⋆ ~ N(0, 1)``.

    Built in float64 and rounded once to float32, so the problem does not depend on the device.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim!r}")
    if not kappa >= 1.0:
        raise ValueError(f"kappa must be >= 1, got {kappa!r}")
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    a = conditioned_matrix(dim, kappa, g)
    b = conditioned_matrix(dim, kappa, g)
    # Entries of size 1/sqrt(dim), like a default-initialised weight, so that every optimizer's
    # default step size is of the right scale and the benchmark measures conditioning alone.
    x_star = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return KronProblem(a.float(), b.float(), x_star.float(), float(noise))


def make_model(problem: KronProblem) -> nn.Sequential:
    """``v -> A X B v`` as ``Linear(B) -> Linear(X) -> Linear(A)``; only ``X`` (index 1) trains.

    ``X`` starts at zero, so the initial excess risk is ``½ ‖A X⋆ B‖²_F`` for every seed's model.
    """
    d = problem.dim
    layers = [nn.Linear(d, d, bias=False) for _ in range(3)]
    with torch.no_grad():
        # nn.Linear computes v Wᵀ on row vectors, i.e. W v on columns: W = B, then X, then A.
        layers[0].weight.copy_(problem.b)
        layers[1].weight.zero_()
        layers[2].weight.copy_(problem.a)
    layers[0].weight.requires_grad_(False)
    layers[2].weight.requires_grad_(False)
    return nn.Sequential(*layers)


def trainable_matrix(model: nn.Sequential) -> Tensor:
    """The ``(dim, dim)`` weight ``X`` (a view)."""
    return model[1].weight


def sample_batch(
    problem: KronProblem, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``(v, y)``, each ``(batch_size, dim)``: probes ``v ~ N(0, I)`` and noisy targets."""
    d = problem.dim
    v = torch.randn(batch_size, d, generator=generator)
    eps = torch.randn(batch_size, d, generator=generator)
    # Row-vector form of y = A X⋆ B v + σ ε.
    y = v @ (problem.a @ problem.x_star @ problem.b).T + problem.noise * eps
    return v, y


def loss_fn(prediction: Tensor, target: Tensor) -> Tensor:
    """``½ mean_batch ‖prediction − target‖²`` (summed over the ``dim`` outputs)."""
    return 0.5 * (prediction - target).square().sum(dim=1).mean()


@torch.no_grad()
def excess_risk(model: nn.Sequential, problem: KronProblem) -> float:
    """``½ ‖A (X − X⋆) B‖²_F``: the expected loss above the noise floor ``½ dim σ²``."""
    x = trainable_matrix(model).double()
    a, b, x_star = problem.a.double(), problem.b.double(), problem.x_star.double()
    return float(0.5 * (a @ (x - x_star) @ b).square().sum())


def initial_excess_risk(problem: KronProblem) -> float:
    """The excess risk at ``X = 0``."""
    a, b, x_star = problem.a.double(), problem.b.double(), problem.x_star.double()
    return float(0.5 * (a @ x_star @ b).square().sum())
