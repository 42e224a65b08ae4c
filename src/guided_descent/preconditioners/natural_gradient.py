"""Exact damped natural-gradient / Gauss–Newton steps by conjugate gradient, matrix-free.

For a model ``f(θ; x)`` with outputs ``z`` and a loss ``L(z)``, the generalized Gauss–Newton
matrix is ``G = Jᵀ H J`` with ``J = ∂z/∂θ`` and ``H = ∂²L/∂z²``. For the losses here it is
also the Fisher of the matching likelihood (Martens 2014, arXiv 1412.1193):

* ``"mse"`` -- ``F.mse_loss(z, y)`` with its default mean over all ``M`` output entries:
  ``H = (2/M) I``; a Gaussian likelihood's Fisher.
* ``"half_squared_error"`` -- ``0.5 * (z - y).square().sum() / N``: half the squared error
  summed over each example's outputs, averaged over the ``N`` examples (dimension 0):
  ``H = I/N``. The same Gaussian model as ``"mse"`` with another scale, and the scale matters:
  a loss ``c`` times another has ``c`` times its ``G``, so naming the wrong one scales every
  step by ``1/c``.
* ``"cross_entropy"`` -- ``F.cross_entropy(z, y)`` on logits ``(N, C)`` or ``(N, C, *)`` (class
  dimension 1) with its default mean over the ``R`` predictions: ``H = (diag p − p pᵀ)/R`` per
  prediction, ``p = softmax(z)``; the softmax likelihood's Fisher.

The step solves ``(G + λ I) u = g`` without forming ``G``: each product ``G v`` is one JVP
(``J v``), the small ``H`` and one VJP (``Jᵀ ·``) through the model, so a conjugate-gradient
iteration costs about one forward and one backward pass; the VJP's graph is built once per step.
That makes this the reference K-FAC approximates, meant for models up to ~1e5 parameters.

Two ways to get ``J v`` (:data:`JacobianProducts`):

* ``"forward"`` -- forward-mode AD (``torch.func.jvp``): one forward pass with dual numbers.
* ``"double_vjp"`` -- two reverse passes: ``Jᵀ u`` is linear in ``u``, so ``J v`` is the gradient
  with respect to ``u`` of ``⟨Jᵀ u, v⟩``. The graph of ``Jᵀ u`` (a backward pass built with
  ``create_graph``) is made once per step; each product is then one reverse pass through it. For
  models with ops that have a backward but no forward-mode rule (fused RNN kernels, custom
  ``autograd.Function`` classes without ``jvp``); it needs their backward to be differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, get_args

import torch
from torch import Tensor

OutputLoss = Literal["mse", "half_squared_error", "cross_entropy"]
OUTPUT_LOSSES: tuple[str, ...] = get_args(OutputLoss)
JacobianProducts = Literal["forward", "double_vjp"]
JACOBIAN_PRODUCTS: tuple[str, ...] = get_args(JacobianProducts)

Params = dict[str, Tensor]


def output_hessian_product(loss: OutputLoss, outputs: Tensor, v: Tensor) -> Tensor:
    """``H v`` for the loss's Hessian ``H`` with respect to the model outputs (shape of ``v``).

    ``mse``: ``2 v / M`` (``M = outputs.numel()``). ``half_squared_error``: ``v / N``
    (``N = outputs.shape[0]``). ``cross_entropy``: per prediction, ``(p ⊙ v − p (pᵀ v)) / R``
    with ``p`` the softmax over dimension 1 and ``R`` the number of predictions. Computed in
    ``v``'s dtype.
    """
    if loss == "mse":
        return v * (2.0 / outputs.numel())
    if loss == "half_squared_error":
        return v / _examples(outputs)
    if loss == "cross_entropy":
        class_dim = 1 if outputs.dim() >= 2 else 0
        p = torch.softmax(outputs.detach().to(v.dtype), dim=class_dim)
        predictions = outputs.numel() // outputs.shape[class_dim]
        pv = p * v
        return (pv - p * pv.sum(class_dim, keepdim=True)) / predictions
    raise ValueError(f"loss must be one of {OUTPUT_LOSSES}, got {loss!r}")


def _examples(outputs: Tensor) -> int:
    return outputs.shape[0] if outputs.dim() else 1


def output_loss_change(
    loss: OutputLoss, outputs: Tensor, output_grad: Tensor, delta: Tensor
) -> float:
    """``L(z + Δ) − L(z)`` for the loss ``L`` whose gradient at ``z = outputs`` is ``output_grad``.

    The targets need not be known: for these losses the change is ``⟨∇L(z), Δ⟩`` plus a term in
    ``z`` and ``Δ`` alone (the loss's Bregman divergence), whatever the targets (hard or soft):

    * ``mse``: ``‖Δ‖²/M``; ``half_squared_error``: ``‖Δ‖²/(2N)``;
    * ``cross_entropy``: ``(1/R) Σ_r [lse(z_r + Δ_r) − lse(z_r) − p_rᵀ Δ_r]`` over the ``R``
      predictions (``lse`` = log-sum-exp over classes, ``p_r = softmax(z_r)``), written as
      ``logsumexp(log p_r + Δ_r) − p_rᵀ Δ_r``.

    In float64: the divergence is a small difference of larger numbers.
    """
    z, g, d = (t.detach().double() for t in (outputs, output_grad, delta))
    linear = float((g * d).sum())
    if loss == "mse":
        return linear + float(d.square().sum()) / z.numel()
    if loss == "half_squared_error":
        return linear + 0.5 * float(d.square().sum()) / _examples(z)
    if loss == "cross_entropy":
        class_dim = 1 if z.dim() >= 2 else 0
        log_p = torch.log_softmax(z, class_dim)
        divergence = torch.logsumexp(log_p + d, class_dim) - (log_p.exp() * d).sum(class_dim)
        return linear + float(divergence.sum()) / divergence.numel()
    raise ValueError(f"loss must be one of {OUTPUT_LOSSES}, got {loss!r}")


def model_loss_change(loss: OutputLoss, outputs: Tensor, output_grad: Tensor, jd: Tensor) -> float:
    """The Gauss–Newton model's prediction of that change for a step ``δ`` with ``J δ = jd``:
    ``⟨∇L(z), J δ⟩ + ½ ⟨J δ, H J δ⟩`` (undamped; in float64)."""
    g, jd64 = output_grad.detach().double(), jd.detach().double()
    curvature = float((jd64 * output_hessian_product(loss, outputs.double(), jd64)).sum())
    return float((g * jd64).sum()) + 0.5 * curvature


@dataclass(frozen=True)
class LevenbergMarquardt:
    """Adapt the damping to how well the Gauss–Newton model predicted the last step.

    Martens 2010, §4.1: with the reduction ratio ``ρ = (actual change of the loss) / (change the
    undamped quadratic model predicted)``, multiply the damping by ``increase`` when
    ``ρ < low`` (the model over-promised: trust it less) and by ``decrease`` when ``ρ > high``.
    The factor stays in ``[min_scale, max_scale]`` times the configured damping: the floor
    keeps a rank-deficient minibatch ``G`` damped, the ceiling bounds the way back. A step with
    ``ρ < reject_below`` (default 0: the step raised the loss of its own batch) is not taken;
    ``None`` takes every step.
    """

    low: float = 0.25
    high: float = 0.75
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min_scale: float = 1e-4
    max_scale: float = 1e4
    reject_below: float | None = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high:
            raise ValueError(f"LevenbergMarquardt: need 0 <= low <= high, got low={self.low!r}, "
                             f"high={self.high!r}")
        if not (self.increase > 1.0 and math.isfinite(self.increase)):
            raise ValueError(f"LevenbergMarquardt: increase must be > 1, got {self.increase!r}")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError(f"LevenbergMarquardt: decrease must be in (0, 1), got "
                             f"{self.decrease!r}")
        if not 0.0 < self.min_scale <= 1.0 <= self.max_scale < math.inf:
            raise ValueError(f"LevenbergMarquardt: need 0 < min_scale <= 1 <= max_scale < inf, "
                             f"got {self.min_scale!r}, {self.max_scale!r}")
        if self.reject_below is not None and not self.reject_below <= self.low:
            raise ValueError(f"LevenbergMarquardt: reject_below must be None or <= low, got "
                             f"{self.reject_below!r}")

    def accepts(self, rho: float | None) -> bool:
        """Whether to take a step with reduction ratio ``rho`` (``None``: unknown, take it)."""
        return rho is None or self.reject_below is None or rho >= self.reject_below

    def update(self, scale: float, rho: float | None) -> float:
        """The next damping scale after a step with reduction ratio ``rho`` (``None``: keep)."""
        if rho is None:
            return scale
        if not rho >= self.low:  # NaN counts as a failed prediction
            scale *= self.increase
        elif rho > self.high:
            scale *= self.decrease
        return min(max(scale, self.min_scale), self.max_scale)


def reduction_ratio(actual: float, predicted: float, noise: float = 0.0) -> float | None:
    """``ρ = actual / predicted`` loss change, for a step the model predicted to lower the loss.

    ``noise`` bounds the rounding error of ``actual`` (see :func:`loss_change_noise`). A step the
    model does not predict to lower the loss by more than ``4 · noise`` (``predicted >= 0``:
    past the model's minimum with ``lr > 2``, or turned by momentum or weight decay; or a step
    too small to measure) has no meaningful ratio: ``-inf`` if the loss clearly rose (or is not
    finite), else ``None`` (no evidence either way). Beyond that, ``ρ`` is off by at most 1/4.
    """
    if not math.isfinite(actual):
        return -math.inf
    if not (predicted < -4.0 * noise and math.isfinite(predicted)):
        return -math.inf if actual > noise else None
    return actual / predicted


def loss_change_noise(outputs: Tensor, output_grad: Tensor) -> float:
    """A bound on the rounding error of :func:`output_loss_change` from outputs computed in
    their own dtype: each output of two forward passes is off by a few ``eps · |z|`` (64 is
    generous for the small models natural gradient is for), weighted by ``|∇L(z)|``."""
    eps = torch.finfo(outputs.dtype).eps
    weighted = output_grad.detach().double().abs() * outputs.detach().double().abs()
    return 64.0 * eps * float(weighted.sum())


@dataclass(frozen=True)
class Linearization:
    """A model linearized at fixed parameters: its ``outputs`` (detached), ``jvp: v ↦ J v``
    (outputs-shaped) and ``vjp: u ↦ Jᵀ u`` (a dict shaped like the parameters)."""

    outputs: Tensor
    jvp: Callable[[Params], Tensor]
    vjp: Callable[[Tensor], Params]


def _one_tensor(outputs: object) -> Tensor:
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model must return one Tensor of outputs, got {type(outputs).__name__}"
        )
    return outputs


def linearize(
    forward: Callable[[Params], Tensor],
    params: Params,
    jacobian: JacobianProducts = "forward",
    *,
    verify: bool = True,
) -> Linearization:
    """Linearize ``z = forward(params)``: one forward pass now, the Jacobian products later.

    ``forward`` maps a dict of parameter tensors to the output tensor (e.g. a
    ``torch.func.functional_call``). ``jacobian`` picks how ``J v`` is computed (see the module
    docstring). Tangents and cotangents are taken in the parameters' and outputs' own dtypes.

    ``verify`` (double-VJP only): check, one reverse pass per parameter, that every parameter's
    ``Jᵀ u`` is differentiable in ``u``, and raise ``RuntimeError`` naming the first that is not.
    A backward that is not differentiable (``once_differentiable``, or computed outside
    autograd) is otherwise invisible: autograd skips the graph piece that would raise, and ``J v``
    silently loses that parameter's columns. The graph's structure does not change from batch to
    batch, so a caller that re-linearizes the same model may verify once.
    """
    if jacobian == "forward":
        outputs, vjp_fn = torch.func.vjp(forward, params)
        outputs = _one_tensor(outputs)

        def forward_jvp(v: Params) -> Tensor:
            _, jv = torch.func.jvp(forward, (params,), (v,))
            return jv

        def forward_vjp(u: Tensor) -> Params:
            (grads,) = vjp_fn(u)
            return grads

        return Linearization(outputs.detach(), forward_jvp, forward_vjp)
    if jacobian != "double_vjp":
        raise ValueError(f"jacobian must be one of {JACOBIAN_PRODUCTS}, got {jacobian!r}")
    # Plain autograd rather than torch.func here: a torch.func VJP of a backward that is not
    # differentiable (a once_differentiable autograd.Function) returns zeros without a word,
    # where autograd raises.
    names = list(params)
    with torch.enable_grad():
        leaves = [params[name].detach().requires_grad_() for name in names]
        outputs = _one_tensor(forward(dict(zip(names, leaves, strict=True))))
        # Jᵀu is linear in u, so J v does not depend on the point u₀ it is differentiated at. A
        # generic u₀ (from a private generator: the caller's random stream is left alone) rather
        # than 0 makes a gradient that lost its graph show up as a nonzero constant.
        u0 = torch.randn(
            outputs.shape, generator=torch.Generator().manual_seed(0), dtype=outputs.dtype
        ).to(outputs.device).requires_grad_()
        grads = torch.autograd.grad(outputs, leaves, u0, create_graph=True, allow_unused=True)
    linked: list[tuple[str, Tensor]] = []
    for name, g in zip(names, grads, strict=True):
        if g is None:
            continue  # the parameter does not reach the outputs: its Jacobian columns are 0
        if g.grad_fn is None:
            if bool(g.any()):
                raise RuntimeError(
                    f"the backward pass to parameter {name!r} is not differentiable (its "
                    "gradient has no graph), so no Jacobian-vector product goes through it"
                )
            continue  # a derivative that is identically zero (e.g. of torch.round)
        linked.append((name, g))
    if verify:
        _verify_differentiable(linked, u0)

    def reverse_jvp(v: Params) -> Tensor:
        if not linked:
            return torch.zeros_like(outputs)
        (jv,) = torch.autograd.grad(
            [g for _, g in linked],
            u0,
            [v[name].to(g.dtype) for name, g in linked],
            retain_graph=True,
        )
        return jv

    def reverse_vjp(u: Tensor) -> Params:
        grads = torch.autograd.grad(
            outputs, leaves, u, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        return dict(zip(names, grads, strict=True))

    return Linearization(outputs.detach(), reverse_jvp, reverse_vjp)


def _verify_differentiable(linked: list[tuple[str, Tensor]], u0: Tensor) -> None:
    """Raise unless each ``g = Jᵀ u₀`` of ``linked`` carries its whole dependence on ``u₀``.

    For ``w = g`` held fixed, ``⟨∇_u ⟨Jᵀu, w⟩, u₀⟩ = ⟨J w, u₀⟩ = ⟨w, Jᵀu₀⟩ = ‖g‖²``. A piece of
    the graph that does not lead back to ``u₀`` drops its share of the left side. Both sides are
    rounded sums in the model's dtype, equal to well within ``sqrt(eps)`` relative.
    """
    for name, g in linked:
        (r,) = torch.autograd.grad(
            g, u0, g.detach(), retain_graph=True, allow_unused=True
        )
        expected = float(g.detach().double().square().sum())
        found = 0.0 if r is None else float((r.double() * u0.detach().double()).sum())
        tolerance = math.sqrt(torch.finfo(g.dtype).eps) * expected
        if not abs(found - expected) <= tolerance:
            raise RuntimeError(
                f"the backward pass to parameter {name!r} is not differentiable (part of its "
                "graph does not lead back to the output cotangent), so no Jacobian-vector "
                "product goes through it"
            )


def gauss_newton_operator(
    forward: Callable[[Params], Tensor],
    params: Params,
    loss: OutputLoss,
    compute_dtype: torch.dtype = torch.float32,
    jacobian: JacobianProducts = "forward",
) -> Callable[[Params], Params]:
    """``v ↦ Jᵀ H J v`` at ``params`` for ``z = forward(params)``, as dicts shaped like ``params``.

    Linearizes once (:func:`linearize`, ``jacobian`` picks how ``J v`` is computed); every call of
    the returned function costs one Jacobian product each way. ``H`` is applied in
    ``compute_dtype``; the tangents and cotangents are cast to the parameters' and outputs' own
    dtypes.
    """
    if loss not in OUTPUT_LOSSES:
        raise ValueError(f"loss must be one of {OUTPUT_LOSSES}, got {loss!r}")
    lin = linearize(forward, params, jacobian)
    return partial(gauss_newton_product, lin, params, loss, compute_dtype)


def gauss_newton_product(
    lin: Linearization, params: Params, loss: OutputLoss, compute_dtype: torch.dtype, v: Params
) -> Params:
    """``Jᵀ H J v`` for the linearization ``lin`` at ``params`` (:func:`gauss_newton_operator`)."""
    tangents = {name: v[name].to(params[name].dtype) for name in params}
    jv = lin.jvp(tangents)
    hjv = output_hessian_product(loss, lin.outputs, jv.to(compute_dtype))
    return lin.vjp(hjv.to(lin.outputs.dtype))


@dataclass(frozen=True)
class CGResult:
    """How a conjugate-gradient solve ended.

    ``iterations``: matrix-vector products used; ``relative_residual``: ``‖r‖/‖b‖``;
    ``converged``: whether it met the tolerance. ``breakdown``: it stopped because a search
    direction had non-positive or non-finite curvature ``pᵀAp`` (``A`` is then not positive
    definite in floating point, or its products overflow); the iterate so far is returned.
    ``condition_estimate``: ``λ_max/λ_min`` of the Ritz values of the Lanczos tridiagonal matrix
    that the CG coefficients define -- a lower bound on ``A``'s condition number that tightens
    with the iterations, free given the coefficients (``None`` before the first full iteration).
    """

    iterations: int
    relative_residual: float
    converged: bool
    breakdown: bool = False
    condition_estimate: float | None = None


def lanczos_condition(alphas: list[float], betas: list[float]) -> float | None:
    """``λ_max/λ_min`` of the Lanczos matrix ``T`` of a CG run (Saad 2003, §6.7.3).

    CG's step sizes ``α_j`` and direction weights ``β_j = ‖r_j‖²/‖r_{j-1}‖²`` (``j >= 1``) give
    ``T_jj = 1/α_j + β_j/α_{j-1}`` and ``T_{j,j-1} = √β_j / α_{j-1}``; its eigenvalues (Ritz
    values) approximate ``A``'s extreme eigenvalues from inside. ``betas[j-1]`` is ``β_j``.
    """
    k = len(alphas)
    if k == 0:
        return None
    T = torch.zeros(k, k, dtype=torch.float64)
    for j, alpha in enumerate(alphas):
        T[j, j] = 1.0 / alpha
        if j > 0:
            beta = betas[j - 1]
            T[j, j] += beta / alphas[j - 1]
            T[j, j - 1] = T[j - 1, j] = math.sqrt(beta) / alphas[j - 1]
    ritz = torch.linalg.eigvalsh(T)
    low, high = float(ritz[0]), float(ritz[-1])
    if not (low > 0.0 and math.isfinite(high)):
        return None
    return high / low


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iterations: int,
    tolerance: float,
) -> tuple[Tensor, CGResult]:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``, from ``x = 0``.

    Stops when ``‖b − A x‖ <= tolerance · ‖b‖``, after ``max_iterations`` products, or when a
    search direction has ``pᵀ A p <= 0`` or a non-finite ``pᵀ A p`` (a breakdown: ``A`` is not
    positive definite in floating point; the iterate so far is returned). ``b = 0`` returns
    ``x = 0`` after no product.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or (
        max_iterations < 1
    ):
        raise ValueError(
            f"conjugate_gradient: max_iterations must be an integer >= 1, got {max_iterations!r}"
        )
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < math.inf):
        raise ValueError(
            f"conjugate_gradient: tolerance must be a finite number >= 0, got {tolerance!r}"
        )
    if b.dim() != 1:
        raise ValueError(f"conjugate_gradient: b must be a vector, got shape {tuple(b.shape)}")
    x = torch.zeros_like(b)
    r = b.clone()
    rr = float(r @ r)
    b_norm = math.sqrt(rr)
    if b_norm == 0.0:
        return x, CGResult(0, 0.0, True)
    target = (tolerance * b_norm) ** 2
    p = r.clone()
    iterations = 0
    converged = breakdown = False
    alphas: list[float] = []
    betas: list[float] = []
    while iterations < max_iterations:
        Ap = matvec(p)
        iterations += 1
        curvature = float(p @ Ap)
        if not (curvature > 0.0 and math.isfinite(curvature)):
            breakdown = True
            break
        alpha = rr / curvature
        alphas.append(alpha)
        x.add_(p, alpha=alpha)
        r.sub_(Ap, alpha=alpha)
        rr_next = float(r @ r)
        if rr_next <= target:
            rr = rr_next
            converged = True
            break
        if not math.isfinite(rr_next):
            breakdown = True  # the residual overflowed: nothing sensible follows from it
            break
        betas.append(rr_next / rr)
        p = r + (rr_next / rr) * p
        rr = rr_next
    residual = math.sqrt(rr) / b_norm if math.isfinite(rr) else math.inf
    return x, CGResult(
        iterations, residual, converged, breakdown, lanczos_condition(alphas, betas)
    )
