"""Linear representation learning under anisotropic inputs: data, model, update rules, metrics.

The pieces the ``linear-representation`` experiment composes (EXPERIMENTS.md §1; the setting of
Zhang et al. 2025, "On the concurrence of layer-wise preconditioning methods and provable feature
learning", arXiv 2502.01763):

* data -- ``Σ_x = Q diag(λ) Qᵀ`` with ``λ`` log-spaced from 1 down to ``1/κ_x`` and rescaled to
  ``tr Σ_x = d_X`` (:func:`input_spectrum`); ``x = Σ_x^{1/2} r`` with Rademacher ``r``;
  ``y = F⋆ G⋆ x + ε`` with ``G⋆`` orthonormal rows and ``F⋆ = U diag(s) Vᵀ``, ``s`` log-spaced
  from 1 down to ``1/√κ_F`` (:func:`head_spectrum`); :func:`make_problem`, :func:`sample`;
* the two-layer linear model ``f(x) = F G x`` (``G`` ``(k, d_X)``, ``F`` ``(d_Y, k)``) with loss
  ``½·mean‖y − FGx‖²``: :func:`loss`, :func:`gradients`;
* update rules as free functions: the alternating layer-wise preconditioned sweep
  (:func:`layerwise_g_step`, :func:`layerwise_f_step`), damped full Gauss–Newton on
  ``vec(F, G)`` (:func:`gauss_newton_step`, with :func:`gauss_newton_matrix` as its dense
  reference) and alternating least squares (:func:`als_sweep`, the reference of claim 5);
* metrics: :func:`subspace_distance` and the transfer task (:func:`transfer_excess_risk`).

Shapes: every function accepts any number of leading batch dimensions (the experiment stacks
seeds along the first one). Data matrices hold samples as rows: ``X`` ``(..., B, d_X)``,
``Y`` ``(..., B, d_Y)``. Everything is float64 (see :data:`DTYPE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from guided_descent.tasks.quadratic import haar_orthogonal

# float64: at κ_x = 1000 a batch covariance of 256 samples in 100 dimensions has a condition number
# near 2e4, and the Gauss–Newton solve sees far worse (its gauge directions are exactly singular);
# float32 round-off there would be visible at the subspace distances we measure (~1e-2). The
# tensors are small, so the cost is Python overhead either way.
DTYPE = torch.float64


def _check_kappa(name: str, kappa: float) -> None:
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"{name} must be a number, got {kappa!r}")
    if not math.isfinite(kappa) or kappa < 1:
        raise ValueError(f"{name} must be a finite number >= 1, got {kappa!r}")


def _check_dim(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def input_spectrum(kappa_x: float, d_x: int) -> Tensor:
    """Eigenvalues of ``Σ_x``: ``d_x`` values log-spaced from 1 down to ``1/κ_x``, then scaled so
    that they sum to ``d_x`` (``tr Σ_x = d_X``: the input has unit energy per coordinate on
    average, whatever ``κ_x``). Returns ``(d_x,)`` float64, decreasing; the ratio of its ends is
    exactly ``κ_x``."""
    _check_kappa("kappa_x", kappa_x)
    _check_dim("d_x", d_x)
    lam = torch.logspace(0.0, -math.log10(kappa_x), d_x, dtype=DTYPE)
    lam[0], lam[-1] = 1.0, 1.0 / kappa_x  # pin the ends: the condition number is exactly κ_x
    return lam * (d_x / lam.sum())


def head_spectrum(kappa_f: float, k: int) -> Tensor:
    """Singular values of ``F⋆``: ``k`` values log-spaced from 1 down to ``1/√κ_F``, so that
    ``F⋆ᵀF⋆`` (the curvature the head puts on ``G``) has condition number ``κ_F``."""
    _check_kappa("kappa_f", kappa_f)
    _check_dim("k", k)
    s = torch.logspace(0.0, -0.5 * math.log10(kappa_f), k, dtype=DTYPE)
    s[0], s[-1] = 1.0, 1.0 / math.sqrt(kappa_f)
    return s


def _orthonormal_columns(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``(rows, cols)`` with Haar-distributed orthonormal columns (the first columns of a Haar
    rotation)."""
    return haar_orthogonal(rows, generator)[:, :cols]


@dataclass(frozen=True)
class Problem:
    """One draw of the generative model (all float64, CPU).

    ``sigma_x`` ``(d_X, d_X)``, its symmetric square root ``sigma_x_sqrt``, eigenvalues
    ``eigenvalues`` ``(d_X,)`` and eigenvectors ``rotation`` (identity when axis-aligned);
    ``g_star`` ``(k, d_X)`` with orthonormal rows; ``f_star`` ``(d_Y, k)``.
    """

    kappa_x: float
    kappa_f: float
    sigma_x: Tensor
    sigma_x_sqrt: Tensor
    eigenvalues: Tensor
    rotation: Tensor
    g_star: Tensor
    f_star: Tensor

    @property
    def target(self) -> Tensor:
        """``W⋆ = F⋆ G⋆`` ``(d_Y, d_X)``: the regression the model has to fit."""
        return self.f_star @ self.g_star


def make_problem(
    d_x: int,
    k: int,
    d_y: int,
    kappa_x: float,
    kappa_f: float,
    generator: torch.Generator,
    rotated: bool = True,
) -> Problem:
    """Draw ``Σ_x`` (Haar rotation ``Q`` if ``rotated``, else ``Q = I``), ``G⋆`` and ``F⋆``.

    ``G⋆`` is drawn independently of ``Q``, so the signal subspace is not aligned with the
    covariance's eigenvectors: in the rotated case every direction of ``G⋆`` mixes large and small
    input variances. The draws consume ``generator`` in a fixed order (Q, G⋆, U, V).
    """
    _check_dim("d_x", d_x, 2)
    _check_dim("k", k)
    _check_dim("d_y", d_y)
    if k > min(d_x, d_y):
        raise ValueError(f"k must be <= min(d_x, d_y) = {min(d_x, d_y)}, got {k}")
    lam = input_spectrum(kappa_x, d_x)
    q = haar_orthogonal(d_x, generator) if rotated else torch.eye(d_x, dtype=DTYPE)
    sigma = (q * lam) @ q.T  # Q diag(λ) Qᵀ without forming diag(λ)
    sigma_sqrt = (q * lam.sqrt()) @ q.T
    # Exactly symmetric, so that Cholesky and eigh see symmetric matrices.
    sigma, sigma_sqrt = 0.5 * (sigma + sigma.T), 0.5 * (sigma_sqrt + sigma_sqrt.T)
    g_star = _orthonormal_columns(d_x, k, generator).T.contiguous()  # (k, d_X)
    u = _orthonormal_columns(d_y, k, generator)  # (d_Y, k)
    v = haar_orthogonal(k, generator)  # (k, k)
    f_star = (u * head_spectrum(kappa_f, k)) @ v.T
    return Problem(float(kappa_x), float(kappa_f), sigma, sigma_sqrt, lam, q, g_star, f_star)


def sample(
    sigma_x_sqrt: Tensor,
    target: Tensor,
    noise_std: float,
    batch: int,
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """A batch per seed: ``X`` ``(S, B, d_X)``, ``Y`` ``(S, B, d_Y)``.

    ``sigma_x_sqrt`` ``(S, d_X, d_X)`` and ``target`` ``(S, d_Y, d_X)`` stack ``S`` problems;
    ``generators[s]`` (on the tensors' device) drives seed ``s`` alone, so a seed's data stream
    does not depend on how many seeds run beside it. Rows: ``x = Σ_x^{1/2} r`` with ``r`` uniform
    on ``{±1}^{d_X}`` (so ``E xxᵀ = Σ_x``), ``y = W⋆x + ε``, ``ε ~ N(0, noise_std² I)``.
    """
    n_seeds, d_x = sigma_x_sqrt.shape[0], sigma_x_sqrt.shape[-1]
    d_y = target.shape[-2]
    if len(generators) != n_seeds:
        raise ValueError(f"need one generator per problem: {n_seeds}, got {len(generators)}")
    dev, dtype = sigma_x_sqrt.device, sigma_x_sqrt.dtype
    signs = torch.stack(
        [torch.randint(0, 2, (batch, d_x), generator=g, device=dev) for g in generators]
    )
    r = signs.to(dtype).mul_(2.0).sub_(1.0)  # (S, B, d_X), entries ±1
    x = r @ sigma_x_sqrt  # rows are (Σ^{1/2} r)ᵀ: Σ^{1/2} is symmetric
    noise = torch.stack(
        [torch.randn(batch, d_y, generator=g, device=dev, dtype=dtype) for g in generators]
    )
    y = x @ target.mT + noise_std * noise
    return x, y


def init_first_layer(k: int, d_x: int, generator: torch.Generator) -> Tensor:
    """``G₀ ~ N(0, 1/d_X)`` entrywise, ``(k, d_X)``: rows of norm about 1."""
    return torch.randn(k, d_x, generator=generator, dtype=DTYPE) / math.sqrt(d_x)


def init_head(d_y: int, k: int, generator: torch.Generator) -> Tensor:
    """``F₀ ~ N(0, 1/k)`` entrywise, ``(d_Y, k)``."""
    return torch.randn(d_y, k, generator=generator, dtype=DTYPE) / math.sqrt(k)


# ---------------------------------------------------------------------------------- the model


def second_moment(a: Tensor) -> Tensor:
    """``Aᵀ A / B`` for rows-as-samples ``A`` ``(..., B, n)``: the batch second moment
    ``(..., n, n)``."""
    return a.mT @ a / a.shape[-2]


def loss(f: Tensor, g: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``½·mean_b ‖y_b − F G x_b‖²``, one value per leading index."""
    residual = x @ g.mT @ f.mT - y  # (..., B, d_Y)
    return 0.5 * residual.pow(2).sum(-1).mean(-1)


def gradients(f: Tensor, g: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(∇_F L, ∇_G L)`` of :func:`loss` in closed form.

    With residual rows ``r_b = F G x_b − y_b`` and ``z_b = G x_b``:
    ``∇_F L = mean_b r_b z_bᵀ`` ``(..., d_Y, k)`` and ``∇_G L = Fᵀ mean_b r_b x_bᵀ``
    ``(..., k, d_X)``.
    """
    z = x @ g.mT  # (..., B, k)
    residual = z @ f.mT - y  # (..., B, d_Y)
    batch = x.shape[-2]
    grad_f = residual.mT @ z / batch
    grad_g = (residual @ f).mT @ x / batch
    return grad_f, grad_g


def relative_damping(m: Tensor, relative: float) -> Tensor:
    """``relative · tr(M) / n`` for ``M`` ``(..., n, n)``, shaped ``(..., 1, 1)`` to broadcast.

    Damping in units of the mean eigenvalue makes it scale-free. Where ``M = 0`` (the head at
    ``F₀ = 0``) it returns 1: the matrix being damped then multiplies a zero gradient, and any
    positive value keeps the solve finite.
    """
    mean_eig = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)
    lam = torch.where(mean_eig > 0, relative * mean_eig, torch.ones_like(mean_eig))
    return lam[..., None, None]


def _spd_solve_left(m: Tensor, b: Tensor, lam: Tensor | float) -> Tensor:
    """``(M + λI)⁻¹ B`` for symmetric positive semi-definite ``M`` via Cholesky."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    chol = torch.linalg.cholesky(m + lam * eye)
    return torch.cholesky_solve(b, chol)


def layerwise_g_step(
    f: Tensor,
    g: Tensor,
    x: Tensor,
    y: Tensor,
    lr: float,
    damping: float,
    one_sided: bool = False,
    sigma_x: Tensor | None = None,
) -> Tensor:
    """``G − η (FᵀF + λ₁I)⁻¹ ∇_G L (Σ̂_x + λ₂I)⁻¹`` on one batch; returns the new ``G``.

    ``λ₁, λ₂`` are ``damping`` times the mean eigenvalue of their matrix
    (:func:`relative_damping`). ``one_sided`` replaces ``FᵀF + λ₁I`` by ``I``: only the input
    side is whitened. Both factors are exactly the two Kronecker factors of the Gauss–Newton
    block of ``G`` (``FᵀF ⊗ Σ̂_x``), which is why this is "K-FAC-like". ``damping = 0`` with
    ``lr = 1`` makes the step the exact least-squares solution for ``G`` given ``F`` (claim 5).
    ``sigma_x``: the batch's :func:`second_moment` of ``x``, if the caller already has it.
    """
    grad_g = gradients(f, g, x, y)[1]  # (..., k, d_X)
    if sigma_x is None:
        sigma_x = second_moment(x)  # (..., d_X, d_X)
    if one_sided:
        left = grad_g
    else:
        ftf = f.mT @ f  # (..., k, k)
        left = _spd_solve_left(ftf, grad_g, relative_damping(ftf, damping))
    # Right-multiplying by a symmetric inverse: (M⁻¹ Aᵀ)ᵀ = A M⁻¹.
    step = _spd_solve_left(sigma_x, left.mT, relative_damping(sigma_x, damping)).mT
    return g - lr * step


def layerwise_f_step(
    f: Tensor, g: Tensor, x: Tensor, y: Tensor, lr: float, damping: float
) -> Tensor:
    """``F − η ∇_F L (Σ̂_z + λI)⁻¹`` with ``z = Gx`` on one batch; returns the new ``F``.

    The Gauss–Newton block of ``F`` is ``I ⊗ Σ̂_z``, so with ``η = 1, λ = 0`` this is the
    least-squares head for the current ``G`` (whatever ``F`` was, e.g. ``F₀ = 0``).
    """
    grad_f = gradients(f, g, x, y)[0]  # (..., d_Y, k)
    sigma_z = second_moment(x @ g.mT)  # (..., k, k)
    step = _spd_solve_left(sigma_z, grad_f.mT, relative_damping(sigma_z, damping)).mT
    return f - lr * step


def als_sweep(f: Tensor, g: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One sweep of alternating least squares, solved directly by ``torch.linalg.lstsq``.

    G-step: ``G₁ = argmin_G Σ_b ‖y_b − F G x_b‖²``. Row-major ``vec(F G x_b) = (F ⊗ x_bᵀ) vec(G)``,
    so stacking the samples gives an ordinary least-squares problem with the ``(B·d_Y, k·d_X)``
    design ``[F ⊗ x_bᵀ]_b``. F-step: ``F₁ = argmin_F Σ_b ‖y_b − F z_b‖²`` with ``z_b = G₁ x_b``,
    i.e. ``lstsq(Z, Y)ᵀ``. This builds the Kronecker design explicitly, so it is only meant as
    an independent reference on small problems (claim 5's unit test), not for training.
    Unbatched: ``f`` ``(d_Y, k)``, ``g`` ``(k, d_X)``, ``x`` ``(B, d_X)``, ``y`` ``(B, d_Y)``.
    """
    d_y, k = f.shape
    d_x = g.shape[1]
    design = torch.einsum("ia,bj->biaj", f, x).reshape(x.shape[0] * d_y, k * d_x)
    g1 = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.reshape(k, d_x)
    f1 = torch.linalg.lstsq(x @ g1.T, y).solution.T
    return f1, g1


# --------------------------------------------------------------------------------- Gauss-Newton


def gauss_newton_matrix(f: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """The dense Gauss–Newton matrix of :func:`loss` on ``θ = (vec F, vec G)`` (row-major vecs).

    ``H = mean_b J_bᵀ J_b`` with ``J_b = ∂(F G x_b)/∂θ``. With ``z = Gx``, blocks (row-major
    ``vec(A M B) = (A ⊗ Bᵀ) vec M``): ``H_FF = I ⊗ Σ̂_z``, ``H_GG = FᵀF ⊗ Σ̂_x``,
    ``H_FG = F ⊗ (G Σ̂_x)``. ``(P, P)`` with ``P = d_Y·k + k·d_X``; unbatched, for tests and
    small problems (:func:`gauss_newton_step` never forms it).
    """
    d_y, k = f.shape
    sigma_x = second_moment(x)
    sigma_z = g @ sigma_x @ g.T
    h_ff = torch.kron(torch.eye(d_y, dtype=f.dtype, device=f.device), sigma_z)
    h_gg = torch.kron(f.T @ f, sigma_x)
    h_fg = torch.kron(f, g @ sigma_x)
    return torch.cat([torch.cat([h_ff, h_fg], 1), torch.cat([h_fg.T, h_gg], 1)], 0)


def gauss_newton_damping(
    f: Tensor, g: Tensor, x: Tensor, relative: float, sigma_x: Tensor | None = None
) -> Tensor:
    """``μ = relative · tr(H) / P``: damping in units of the Gauss–Newton matrix's mean
    eigenvalue, ``(..., 1, 1)``. ``tr H = d_Y tr Σ̂_z + tr(FᵀF) tr Σ̂_x``."""
    d_y, k = f.shape[-2], f.shape[-1]
    d_x = g.shape[-1]
    if sigma_x is None:
        sigma_x = second_moment(x)
    tr_x = torch.diagonal(sigma_x, dim1=-2, dim2=-1).sum(-1)
    tr_z = torch.diagonal(g @ sigma_x @ g.mT, dim1=-2, dim2=-1).sum(-1)
    tr_h = d_y * tr_z + f.pow(2).sum((-2, -1)) * tr_x
    return (relative * tr_h / (d_y * k + k * d_x))[..., None, None]


def gauss_newton_step(
    f: Tensor,
    g: Tensor,
    x: Tensor,
    y: Tensor,
    damping: float,
    lr: float = 1.0,
    sigma_x: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``θ − η (H + μI)⁻¹ ∇L`` on ``θ = (F, G)`` jointly; returns the new ``(F, G)``.

    ``H`` is the full (not block-diagonal) Gauss–Newton matrix of :func:`gauss_newton_matrix`
    and ``μ`` = :func:`gauss_newton_damping`. The solve is exact but never forms the
    ``P × P`` matrix: eliminating ``δF`` (its block ``I ⊗ (Σ̂_z + μ)`` is trivial to invert)
    leaves, for ``δG``, the Schur complement

        S δG = FᵀF δG M + μ δG,   M = Σ̂_x − Σ̂_x Gᵀ (Σ̂_z + μI)⁻¹ G Σ̂_x,

    a Kronecker product plus ``μI``, which two small eigendecompositions (``FᵀF`` ``(k, k)`` and
    ``M`` ``(d_X, d_X)``) invert exactly. Then ``δF = (∇_F L − F δG Σ̂_x Gᵀ)(Σ̂_z + μI)⁻¹``.
    ``M`` is the input covariance left over after regressing on ``z = Gx``: it is near-singular
    along the current representation, which is where the model's ``F → FA, G → A⁻¹G`` symmetry
    makes ``H`` exactly singular and small dampings produce large steps. ``sigma_x``: the
    batch's :func:`second_moment` of ``x``, if the caller already has it.
    """
    grad_f, grad_g = gradients(f, g, x, y)
    if sigma_x is None:
        sigma_x = second_moment(x)  # (..., d_X, d_X)
    mu = gauss_newton_damping(f, g, x, damping, sigma_x)  # (..., 1, 1)
    gs = g @ sigma_x  # (..., k, d_X)
    sigma_z = gs @ g.mT  # (..., k, k)
    eye_k = torch.eye(sigma_z.shape[-1], dtype=f.dtype, device=f.device)
    chol_z = torch.linalg.cholesky(sigma_z + mu * eye_k)

    # (Σ̂_z + μ)⁻¹ applied on the right of a (.., n, k) matrix A: (C⁻¹ Aᵀ)ᵀ.
    def right_solve(a: Tensor) -> Tensor:
        return torch.cholesky_solve(a.mT, chol_z).mT

    m = sigma_x - gs.mT @ torch.cholesky_solve(gs, chol_z)  # (..., d_X, d_X)
    m = 0.5 * (m + m.mT)
    rhs = grad_g - f.mT @ right_solve(grad_f) @ gs  # (..., k, d_X)
    e_f, v_f = torch.linalg.eigh(f.mT @ f)
    e_m, v_m = torch.linalg.eigh(m)
    # Both are PSD; round-off can leave eigenvalues at -1e-16, which must not cancel μ.
    e_f, e_m = e_f.clamp_min(0.0), e_m.clamp_min(0.0)
    denom = e_f[..., :, None] * e_m[..., None, :] + mu  # (..., k, d_X)
    delta_g = v_f @ ((v_f.mT @ rhs @ v_m) / denom) @ v_m.mT
    delta_f = right_solve(grad_f - f @ delta_g @ gs.mT)
    return f - lr * delta_f, g - lr * delta_g


# ------------------------------------------------------------------------------------ metrics


def subspace_distance(g: Tensor, g_star: Tensor) -> Tensor:
    """``‖(I − G⋆ᵀG⋆) Q_G‖₂``: the sine of the largest principal angle between the row spaces.

    ``Q_G`` ``(..., d_X, k)`` is an orthonormal basis of ``G``'s row space (QR of ``Gᵀ``);
    ``G⋆`` must have orthonormal rows. 0 when the row spaces agree, 1 when some direction of
    ``G`` is orthogonal to ``G⋆``; unchanged by ``G → AG`` for invertible ``A`` (the row space is).
    Computed from the projection residual rather than as ``√(1 − σ_min(G⋆Q_G)²)``, which loses
    all precision for small angles.
    """
    q, _ = torch.linalg.qr(g.mT)
    residual = q - g_star.mT @ (g_star @ q)
    return torch.linalg.matrix_norm(residual, ord=2)


@dataclass(frozen=True)
class TransferTask:
    """A downstream task sharing ``G⋆``: its own covariance and head (stacked over seeds).

    ``sigma_x`` / ``sigma_x_sqrt`` ``(S, d_X, d_X)``, ``target`` ``(S, d_Y, d_X)`` = ``F' G⋆``.
    """

    sigma_x: Tensor
    sigma_x_sqrt: Tensor
    target: Tensor


def make_transfer_task(
    problem: Problem, generator: torch.Generator, rotated: bool = True
) -> Problem:
    """A new task for ``problem``'s ``G⋆``: fresh covariance rotation and head, same spectra.

    The new covariance has the same eigenvalues in new (Haar) directions, so the directions the
    source task barely excited can now carry variance: a representation that is wrong there is
    exposed. The head is a fresh ``U' diag(s) V'ᵀ``.
    """
    d_x, k, d_y = problem.g_star.shape[1], problem.g_star.shape[0], problem.f_star.shape[0]
    other = make_problem(d_x, k, d_y, problem.kappa_x, problem.kappa_f, generator, rotated)
    return Problem(
        problem.kappa_x,
        problem.kappa_f,
        other.sigma_x,
        other.sigma_x_sqrt,
        other.eigenvalues,
        other.rotation,
        problem.g_star,
        other.f_star,
    )


def fit_head(g: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Least-squares head for a frozen representation: ``argmin_F Σ_b ‖y_b − F G x_b‖²``,
    ``(..., d_Y, k)``."""
    return torch.linalg.lstsq(x @ g.mT, y).solution.mT


def population_risk(f: Tensor, g: Tensor, target: Tensor, sigma_x: Tensor) -> Tensor:
    """``E‖W x − F G x‖²`` over the task's inputs, ``tr(Δ Σ_x Δᵀ)`` with ``Δ = W − F G``.

    The noise term ``d_Y σ²`` is left out: it is the same for every representation.
    """
    delta = target - f @ g
    return (delta @ sigma_x * delta).sum((-2, -1))


def transfer_excess_risk(
    g: Tensor,
    g_star: Tensor,
    task: TransferTask,
    n: int,
    noise_std: float,
    draws: int,
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """Excess risk of a frozen ``G`` on the transfer task, against the oracle ``G⋆``.

    For each of ``draws`` training sets of ``n`` samples (the same sets for ``G`` and ``G⋆``, so
    the difference is paired), fit a head by least squares on top of each representation and
    take the population risks (:func:`population_risk`). Returns ``(excess, oracle)``, each
    ``(S,)``: the mean over draws of ``risk(G) − risk(G⋆)`` and of ``risk(G⋆)``.
    """
    if n < g.shape[-2]:
        raise ValueError(f"n must be at least k = {g.shape[-2]} to fit a head, got {n}")
    excess = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    oracle = torch.zeros_like(excess)
    for _ in range(draws):
        x, y = sample(task.sigma_x_sqrt, task.target, noise_std, n, generators)
        r_g = population_risk(fit_head(g, x, y), g, task.target, task.sigma_x)
        r_star = population_risk(fit_head(g_star, x, y), g_star, task.target, task.sigma_x)
        excess += r_g - r_star
        oracle += r_star
    return excess / draws, oracle / draws
