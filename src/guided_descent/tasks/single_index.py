"""A single-index model under anisotropic Gaussian inputs and a two-layer student (one step).

The pieces the ``single-index`` experiment composes, all batched over a leading seed dimension
``S`` so that every seed of one (κ, ψ) cell runs in the same tensor operations:

* :func:`input_spectrum`, :func:`make_problems` -- ``Σ_x = Q diag(λ) Qᵀ`` with ``λ`` log-spaced in
  ``[1/κ, 1]`` and rescaled so that ``tr Σ_x = d``, ``Q`` Haar-random, and a direction ``β⋆``
  uniform on the unit sphere;
* :func:`sample` -- ``x = Q diag(√λ) r`` with ``r ~ N(0, I)`` and ``y = σ⋆(⟨β⋆, x⟩) + ε``;
* :func:`symmetric_init`, :func:`student` -- ``f(x) = aᵀσ(Wx)/√N`` whose neurons come in pairs
  (same row of ``W``, second-layer weights ``+a_j`` and ``-a_j``), so ``f ≡ 0`` at initialisation;
* :func:`gradient_sums`, :func:`batchnorm_gradient`, :func:`adam_first_step` -- the first-layer
  gradient of ``L̂ = (1/2n) Σᵢ (yᵢ - f(xᵢ))²`` without and with a batch-norm layer on the
  pre-activations, and the direction of Adam's first step;
* :func:`top_direction`, :func:`alignment`, :func:`ceiling`, :func:`sign_limit` -- the spike
  ``v₁`` of ``W₁ - W₀`` (top right singular vector), ``|cos∠(v₁, β⋆)|``, SGD's limit
  ``cos∠(Σ_xβ⋆, β⋆)`` and Adam's ``|cos∠(sign(Σ_xβ⋆), β⋆)|``;
* :func:`features`, :func:`ridge_path` -- step two: a ridge fit of the second layer on frozen
  first-layer features.

Why the SGD spike is biased: with ``f ≡ 0`` the gradient of row ``j`` is
``-(a_j/√N)·E[y σ'(w_jᵀx) x]``; Stein's lemma for ``x ~ N(0, Σ_x)`` turns ``E[g(x) x]`` into
``Σ_x E[∇g(x)]``, whose part shared by every row is ``∝ Σ_x β⋆``. Right-multiplying the gradient
by ``Σ_x⁻¹`` (or an estimate of it) removes the ``Σ_x``.

Shapes are written as ``(S, n, d)`` (seeds, samples, input dimension) and ``(S, N, d)`` (first
layer). Data and first-layer work are float32; small ``d x d`` matrices and the ridge solves are
float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import guided_descent
from guided_descent.linalg import eigh
from guided_descent.tasks.quadratic import haar_orthogonal, spectrum

ACTIVATIONS: tuple[str, ...] = ("tanh", "relu")
# torch.nn.functional.batch_norm's default: keeps a constant pre-activation finite.
BATCHNORM_EPS = 1e-5
DTYPE = torch.float32


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """``σ`` by name (``tanh`` or ``relu``)."""
    match name:
        case "tanh":
            return torch.tanh
        case "relu":
            return torch.relu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_derivative(name: str) -> Callable[[Tensor], Tensor]:
    """``σ'`` by name; relu's derivative at 0 is taken as 0, as autograd does."""
    match name:
        case "tanh":
            return lambda z: 1.0 - torch.tanh(z).square()
        case "relu":
            return lambda z: (z > 0).to(z.dtype)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def stream_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one (seed, purpose) pair, independent of every other pair.

    Each seed draws its problem, initialisation and data from its own streams, so a seed's numbers
    do not depend on how many seeds run beside it or in which order the draws happen.
    """
    entropy = [seed, *stream.encode()]
    state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


def input_spectrum(kappa: float, dim: int) -> Tensor:
    """Eigenvalues of ``Σ_x``: log-spaced in ``[1/κ, 1]``, then rescaled so that they sum to ``d``.

    Returns ``(dim,)`` float64, increasing. The rescaling keeps ``E‖x‖² = d`` at every κ, so a
    random unit direction sees ``E[βᵀΣ_xβ] = 1`` and the target's scale does not change with κ.
    """
    lam = spectrum(kappa, dim)
    return lam * (dim / lam.sum())


@dataclass(frozen=True)
class Problems:
    """The single-index problems of ``S`` seeds at one κ.

    ``rotation`` ``(S, d, d)`` and ``eigenvalues`` ``(d,)`` define ``Σ_x = Q diag(λ) Qᵀ``
    (``covariance``, ``(S, d, d)``); ``beta`` ``(S, d)`` has unit rows. All float64.
    """

    kappa: float
    eigenvalues: Tensor
    rotation: Tensor
    beta: Tensor

    @property
    def dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def covariance(self) -> Tensor:
        q = self.rotation
        return (q * self.eigenvalues) @ q.mT

    @property
    def covariance_inverse(self) -> Tensor:
        q = self.rotation
        return (q / self.eigenvalues) @ q.mT

    def to(self, device: torch.device | str) -> Problems:
        return Problems(
            self.kappa,
            self.eigenvalues.to(device),
            self.rotation.to(device),
            self.beta.to(device),
        )


def make_problems(kappa: float, dim: int, seeds: Sequence[int]) -> Problems:
    """``Q`` Haar-random and ``β⋆`` uniform on the sphere, per seed, on the CPU in float64.

    Both come from the seed alone, so one seed's problems at different κ differ only in their
    spectrum: comparisons across κ then compare like with like.
    """
    lam = input_spectrum(kappa, dim)
    rotations, betas = [], []
    for seed in seeds:
        gen = stream_generator(seed, "problem")
        rotations.append(haar_orthogonal(dim, gen))
        b = torch.randn(dim, generator=gen, dtype=torch.float64)
        betas.append(b / torch.linalg.vector_norm(b))
    return Problems(float(kappa), lam, torch.stack(rotations), torch.stack(betas))


def standard_draws(
    seeds: Sequence[int], stream: str, n: int, dim: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """``r ~ N(0, I_d)`` ``(S, n, d)`` and ``ξ ~ N(0, 1)`` ``(S, n)``, float32, one stream per seed.

    Kept apart from :func:`sample` so that one draw serves every κ (paired comparisons) and a
    prefix of it serves every smaller sample size (nested data sets).
    """
    r, xi = [], []
    for seed in seeds:
        gen = stream_generator(seed, stream, device)
        r.append(torch.randn(n, dim, generator=gen, device=device, dtype=DTYPE))
        xi.append(torch.randn(n, generator=gen, device=device, dtype=DTYPE))
    return torch.stack(r), torch.stack(xi)


def sample(
    problems: Problems, r: Tensor, xi: Tensor, target: str = "tanh", noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Inputs ``x = Q diag(√λ) r`` ``(S, n, d)`` and labels ``y = σ⋆(⟨β⋆, x⟩) + noise·ξ``
    ``(S, n)``.

    ``Cov(x) = Q diag(λ) Qᵀ = Σ_x``. Both come out in ``r``'s dtype (float32): the labels'
    round-off (~1e-7) is far below the label noise.
    """
    q, lam = problems.rotation, problems.eigenvalues
    root = (q * lam.sqrt()).to(r.dtype)  # (S, d, d) = Q diag(√λ)
    x = r @ root.mT  # rows xᵢᵀ = rᵢᵀ diag(√λ) Qᵀ
    index = (x @ problems.beta.to(r.dtype).unsqueeze(-1)).squeeze(-1)  # (S, n)
    y = activation(target)(index) + noise * xi
    return x, y


def ceiling(covariance: Tensor, beta: Tensor) -> Tensor:
    """``cos∠(Σ_xβ⋆, β⋆) = β⋆ᵀΣ_xβ⋆ / (‖Σ_xβ⋆‖ ‖β⋆‖)`` per seed: ``(S, d, d), (S, d) -> (S,)``.

    The alignment SGD's spike tends to as the sample grows, since that spike points along
    ``Σ_xβ⋆``. It is 1 when ``β⋆`` is an eigenvector of ``Σ_x`` (always, at κ = 1).
    """
    sb = (covariance @ beta.unsqueeze(-1)).squeeze(-1)
    return (sb * beta).sum(-1) / (
        torch.linalg.vector_norm(sb, dim=-1) * torch.linalg.vector_norm(beta, dim=-1)
    )


def sign_limit(covariance: Tensor, beta: Tensor) -> Tensor:
    """``|cos∠(sign(Σ_xβ⋆), β⋆)|`` per seed: ``(S, d, d), (S, d) -> (S,)``.

    Where the gradient is close to its rank-one part ``u (Σ_xβ⋆)ᵀ`` entry by entry, Adam's sign-like
    first step is ``sign(u) sign(Σ_xβ⋆)ᵀ``, whose right singular vector is ``sign(Σ_xβ⋆)/√d``:
    this is the alignment Adam's spike tends to. For a Gaussian-like vector ``sign`` alone costs a
    factor ``E|z|/√(E z²) = √(2/π) ≈ 0.80``.
    """
    sb = (covariance @ beta.unsqueeze(-1)).squeeze(-1)
    return alignment(torch.sign(sb), beta)


def symmetric_init(
    width: int, dim: int, seeds: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """First layer ``W₀`` ``(S, N, d)`` and second layer ``a`` ``(S, N)``, float32, ``N = width``.

    Rows ``0 .. N/2-1`` of ``W₀`` are uniform on the unit sphere and rows ``N/2 .. N-1`` repeat
    them; ``a`` is ``N(0, 1)`` on the first half and its negative on the second. Paired neurons
    cancel, so ``f ≡ 0`` while every neuron's gradient is non-zero: without this the random
    initial function's residual adds a gradient term unrelated to ``β⋆`` that buries the spike.
    Gaussian ``a`` spreads the neurons' step sizes, which gives step two features at many scales.
    """
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2, got {width!r}")
    half = width // 2
    ws, as_ = [], []
    for seed in seeds:
        gen = stream_generator(seed, "init")
        w = torch.randn(half, dim, generator=gen, dtype=torch.float64)
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        a = torch.randn(half, generator=gen, dtype=torch.float64)
        ws.append(torch.cat([w, w]))
        as_.append(torch.cat([a, -a]))
    return (
        torch.stack(ws).to(device=device, dtype=DTYPE),
        torch.stack(as_).to(device=device, dtype=DTYPE),
    )


def batchnorm(pre: Tensor) -> Tensor:
    """Training-mode batch norm without affine parameters over the sample dimension of
    ``(S, n, N)`` pre-activations: each (seed, neuron) column to mean 0 and variance 1 (biased
    variance, ``eps`` as torch's)."""
    mean = pre.mean(dim=-2, keepdim=True)
    var = pre.var(dim=-2, unbiased=False, keepdim=True)
    return (pre - mean) * torch.rsqrt(var + BATCHNORM_EPS)


def student(w: Tensor, a: Tensor, x: Tensor, act: str = "tanh", bn: bool = False) -> Tensor:
    """``f(x) = aᵀσ(Wx)/√N`` (``bn``: ``aᵀσ(BN(Wx))/√N``): ``(S,N,d), (S,N), (S,n,d) -> (S,n)``."""
    pre = x @ w.mT  # (S, n, N)
    if bn:
        pre = batchnorm(pre)
    return (activation(act)(pre) @ a.unsqueeze(-1)).squeeze(-1) / math.sqrt(w.shape[-2])


def gradient_sums(
    w: Tensor, a: Tensor, x: Tensor, y: Tensor, act: str = "tanh"
) -> tuple[Tensor, Tensor]:
    """``Σᵢ rᵢ (a ⊙ σ'(Wxᵢ)) xᵢᵀ`` ``(S, N, d)`` and ``Σᵢ xᵢxᵢᵀ`` ``(S, d, d)``, both float64.

    ``rᵢ = yᵢ - f(xᵢ)``. The gradient of ``L̂ = (1/2n) Σᵢ (yᵢ - f(xᵢ))²`` over the samples summed
    is ``-(first sum)/(n √N)``; the second sum over ``n`` is the (uncentred) ``Σ̂_x``. Both are
    sums, so a sample set can be fed in chunks and a prefix's sums are a running total: one pass
    over the largest data set gives every smaller nested one. Products run in float32 (``x`` is
    float32) and are accumulated in float64.
    """
    pre = x @ w.mT  # (S, n, N) float32
    f = (activation(act)(pre) @ a.unsqueeze(-1)).squeeze(-1) / math.sqrt(w.shape[-2])
    r = y - f  # (S, n)
    weights = activation_derivative(act)(pre) * a.unsqueeze(-2) * r.unsqueeze(-1)  # (S, n, N)
    return (weights.mT @ x).double(), (x.mT @ x).double()


def nested_gradient_sums(
    w: Tensor,
    a: Tensor,
    x: Tensor,
    y: Tensor,
    sizes: Sequence[int],
    act: str = "tanh",
    max_elements: int = 1 << 23,
) -> dict[int, tuple[Tensor, Tensor]]:
    """:func:`gradient_sums` over the first ``n`` samples, for every ``n`` in ``sizes``.

    One pass over ``x[:, :max(sizes)]`` in chunks of at most ``max_elements`` hidden activations
    (``S x chunk x N``), with a snapshot of the running sums at each size: the step-one data sets
    of all ψ are prefixes of one draw, so they cost one pass over the largest.
    """
    if not sizes or min(sizes) < 1 or max(sizes) > x.shape[-2]:
        raise ValueError(f"sizes must lie in [1, {x.shape[-2]}], got {sizes!r}")
    chunk = max(1, max_elements // (w.shape[0] * w.shape[-2]))
    stops = sorted(set(sizes))
    out: dict[int, tuple[Tensor, Tensor]] = {}
    g_sum: Tensor | None = None
    xx_sum: Tensor | None = None
    start = 0
    for stop in stops:
        while start < stop:
            end = min(stop, start + chunk)
            g, xx = gradient_sums(w, a, x[:, start:end], y[:, start:end], act)
            g_sum = g if g_sum is None else g_sum + g
            xx_sum = xx if xx_sum is None else xx_sum + xx
            start = end
        assert g_sum is not None and xx_sum is not None
        out[stop] = (g_sum.clone(), xx_sum.clone())
    return out


def batchnorm_gradient(
    w: Tensor, a: Tensor, x: Tensor, y: Tensor, act: str = "tanh", max_elements: int = 1 << 25
) -> Tensor:
    """``∇_W L̂`` ``(S, N, d)`` float32 for the student with batch norm on the pre-activations.

    The batch statistics are those of all ``n`` samples (one full-batch step), so the batch
    cannot be split into chunks; seeds are processed in groups instead so that one ``(n, N)``
    activation tensor holds at most ``max_elements`` values per group (the graph keeps a few).
    """
    n, width = x.shape[-2], w.shape[-2]
    group = max(1, max_elements // (n * width))
    grads = []
    for s in range(0, w.shape[0], group):
        ws = w[s : s + group].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            f = student(ws, a[s : s + group], x[s : s + group], act, bn=True)
            # Seeds are independent: the sum of their losses has each seed's gradient.
            loss = 0.5 * (y[s : s + group] - f).square().mean(-1).sum()
            (g,) = torch.autograd.grad(loss, ws)
        grads.append(g)
    return torch.cat(grads)


def adam_first_step(grad: Tensor, eps: float) -> Tensor:
    """The update ``W₁ - W₀`` of torch's Adam at ``lr = 1`` after one step from fresh state.

    Bias correction makes the first moments exactly ``m̂ = g`` and ``v̂ = g²``, so the step is
    ``-g / (|g| + eps)``: the sign of ``g`` wherever ``|g| ≫ eps``. It is taken by the library's
    ``adam`` (``torch.optim.Adam``) on a copy, not re-derived here.
    """
    p = torch.zeros_like(grad)
    opt = guided_descent.create("adam", [p], lr=1.0, eps=eps)
    p.grad = grad
    opt.step()
    return p.detach()


def top_direction(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Top right singular vector ``v₁`` ``(S, d)`` and value ``s₁`` ``(S,)`` of ``delta``
    ``(S, N, d)``, in float64, from the eigendecomposition of the ``d x d`` Gram ``ΔᵀΔ`` (cheaper
    than an SVD of the ``N x d`` matrix, and exact enough: only the top pair is used)."""
    d64 = delta.double()
    vals, vecs = eigh(d64.mT @ d64)
    return vecs[..., -1], vals[..., -1].clamp_min(0.0).sqrt()


def alignment(v: Tensor, beta: Tensor) -> Tensor:
    """``|cos∠(v, β)|`` per row: ``(S, d), (S, d) -> (S,)``. A singular vector's sign is
    arbitrary, hence the absolute value."""
    v, beta = v.double(), beta.double()
    cos = (v * beta).sum(-1) / (
        torch.linalg.vector_norm(v, dim=-1) * torch.linalg.vector_norm(beta, dim=-1)
    )
    return cos.abs()


def features(
    w: Tensor, x: Tensor, act: str, bn_stats: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Step two's features ``σ(Wx)/√N`` ``(S, n, N)``; with ``bn_stats = (mean, std)`` (each
    ``(S, 1, N)``) the pre-activations are normalised first, with statistics held fixed."""
    pre = x @ w.mT
    if bn_stats is not None:
        mean, std = bn_stats
        pre = (pre - mean) / std
    return activation(act)(pre) / math.sqrt(w.shape[-2])


def batchnorm_stats(w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per (seed, neuron) mean and ``sqrt(var + eps)`` of the pre-activations ``Wx`` over ``x``."""
    pre = x @ w.mT
    var = pre.var(dim=-2, unbiased=False, keepdim=True)
    return pre.mean(dim=-2, keepdim=True), (var + BATCHNORM_EPS).sqrt()


@dataclass(frozen=True)
class RidgeFit:
    """Step two's result per seed: the chosen relative penalty, its validation and test MSE."""

    penalty: Tensor  # (S,) float64, relative (see ridge_path)
    val_mse: Tensor  # (S,)
    test_mse: Tensor  # (S,)


def ridge_path(
    phi_train: Tensor,
    y_train: Tensor,
    phi_val: Tensor,
    y_val: Tensor,
    phi_test: Tensor,
    y_test: Tensor,
    penalties: Sequence[float],
) -> RidgeFit:
    """Ridge regression of ``y`` on features ``φ`` with an unpenalised intercept, per seed.

    For each relative penalty ``ρ`` solve ``(ΦcᵀΦc + ρ·(tr ΦcᵀΦc / N)·I) c = Φcᵀyc`` (``Φc``,
    ``yc`` centred on the training set): ``ρ`` is measured in units of the mean eigenvalue of
    the feature Gram, so one grid suits every method's feature scale. The ``ρ`` with the least
    validation MSE is kept per seed and its test MSE returned. Solves are Cholesky in float64.
    """
    phi_mean = phi_train.mean(dim=-2, keepdim=True)
    y_mean = y_train.mean(dim=-1, keepdim=True)
    pc = (phi_train - phi_mean).double()
    yc = (y_train - y_mean).double()
    gram = pc.mT @ pc  # (S, N, N)
    rhs = (pc.mT @ yc.unsqueeze(-1)).squeeze(-1)  # (S, N)
    width = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / width  # (S,)
    eye = torch.eye(width, dtype=gram.dtype, device=gram.device)

    # Centred once, outside the loop over penalties: (S, n, N) float64.
    val_c, test_c = (phi_val - phi_mean).double(), (phi_test - phi_mean).double()
    val_target, test_target = (y_val - y_mean).double(), (y_test - y_mean).double()

    val, test = [], []
    for rho in penalties:
        chol = torch.linalg.cholesky(gram + (rho * scale)[:, None, None] * eye)
        coef = torch.cholesky_solve(rhs.unsqueeze(-1), chol)  # (S, N, 1)
        val.append(((val_c @ coef).squeeze(-1) - val_target).square().mean(-1))
        test.append(((test_c @ coef).squeeze(-1) - test_target).square().mean(-1))
    val_t, test_t = torch.stack(val, -1), torch.stack(test, -1)  # (S, len(penalties))
    best = val_t.argmin(-1)
    grid = torch.tensor(list(penalties), dtype=torch.float64, device=gram.device)
    pick = best.unsqueeze(-1)
    return RidgeFit(
        grid[best], val_t.gather(-1, pick).squeeze(-1), test_t.gather(-1, pick).squeeze(-1)
    )


__all__ = [
    "ACTIVATIONS",
    "Problems",
    "RidgeFit",
    "activation",
    "activation_derivative",
    "adam_first_step",
    "alignment",
    "batchnorm",
    "batchnorm_gradient",
    "batchnorm_stats",
    "ceiling",
    "features",
    "gradient_sums",
    "input_spectrum",
    "make_problems",
    "nested_gradient_sums",
    "ridge_path",
    "sample",
    "sign_limit",
    "standard_draws",
    "stream_generator",
    "symmetric_init",
    "top_direction",
]
