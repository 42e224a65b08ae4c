"""Grafting: take an update's direction from one method and its size from another.

Agarwal et al. 2020 ("Disentangling adaptive gradient methods from learning rates",
arXiv 2002.11803) observed that much of what separates optimizers is the per-layer step size, not
the direction. Shampoo (Anil et al. 2020, arXiv 2002.09018) therefore takes the *direction* of its
Kronecker-preconditioned update ``D`` and the *size* of a cheap diagonal method's update ``A``::

    update = D * ||A||_F / ||D||_F           (per parameter or per block)

so that Shampoo inherits the learning rate (and schedule) tuned for the diagonal method. The
diagonal method here is Adam or AdaGrad; its update is also what a parameter receives where no
Kronecker preconditioner exists (vectors, oversized dimensions, before preconditioning starts).

The diagonal update, for a first moment ``m_hat`` (bias-corrected, supplied by the caller) and the
accumulator ``s`` of squared gradients kept here::

    adam:     s = beta2 * s + (1 - beta2) * g²     A = m_hat / (sqrt(s) / sqrt(1 - beta2^t) + eps)
    adagrad:  s = s + g²                           A = m_hat / (sqrt(s) + eps)

The Adam form writes the bias correction and ``eps`` exactly as ``torch.optim.Adam`` does, so with
``m_hat = m / (1 - beta1^t)`` the update equals torch's step for step.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from guided_descent.transforms.masking import bias_correction, commit_
from guided_descent.transforms.state_dtype import compute_dtype as widest

Grafting = Literal["adam", "adagrad", "none"]
GRAFTINGS: tuple[str, ...] = get_args(Grafting)


def check_grafting(owner: str, value: object) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``value`` is one of :data:`GRAFTINGS`."""
    if value not in GRAFTINGS:
        raise ValueError(f"{owner}: grafting must be one of {GRAFTINGS}, got {value!r}")


def accumulate_squares_(
    acc: Tensor, grad: Tensor, grafting: Grafting, beta2: float, ok: Tensor | None = None
) -> Tensor:
    """Add ``grad²`` to the diagonal accumulator in place: a sum for AdaGrad, else an EMA; return
    the new accumulator for the step to use.

    ``"none"`` keeps Adam's EMA: the diagonal update is still what vectors and
    not-yet-preconditioned parameters receive. With ``ok`` (a 0-d bool tensor) the accumulator
    changes only where it is true (:func:`~guided_descent.transforms.masking.commit_`). An
    accumulator stored in another dtype than ``grad``'s (``state_dtype``: bf16 beside a float32
    gradient) is read widened (:func:`~guided_descent.transforms.state_dtype.compute_dtype`),
    advanced there by the kernels of the in-place path and rounded into ``acc`` once; the result
    is then the unrounded, widened value (else ``acc`` itself, or the masked path's new tensor).
    """
    if ok is None and acc.dtype == grad.dtype:
        if grafting == "adagrad":
            return acc.addcmul_(grad, grad)
        return acc.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    # Out of place, kept only where ok; (..) float32 from a bf16 acc (``.to`` is acc itself when
    # the dtypes agree).
    dtype = widest(acc, grad)
    wide, grad = acc.to(dtype), grad.to(dtype)
    if grafting == "adagrad":
        new = wide.addcmul(grad, grad)
    else:
        new = wide.mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    commit_(acc, new, ok)
    return new


def diagonal_update(
    exp_avg_hat: Tensor,
    acc: Tensor,
    grafting: Grafting,
    *,
    beta2: float,
    step: int | Tensor,
    eps: float,
) -> Tensor:
    """The diagonal method's update direction ``A`` (a new tensor; see the module docstring).

    ``step`` is a host int, or a 0-d tensor for a step that does not read counters on the host.
    """
    if grafting == "adagrad":
        denom = acc.sqrt().add_(eps)
    else:
        denom = acc.sqrt().div_(bias_correction(beta2, step) ** 0.5).add_(eps)
    return exp_avg_hat / denom


def graft(direction: Tensor, magnitude: Tensor) -> Tensor:
    """``direction`` rescaled to the Frobenius norm of ``magnitude`` (0 where ``direction`` is 0).

    The norms are taken in at least float32 so that a bfloat16 block does not lose the scale.
    """
    dtype = torch.promote_types(direction.dtype, torch.float32)
    d_norm = torch.linalg.vector_norm(direction, dtype=dtype)
    m_norm = torch.linalg.vector_norm(magnitude, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return direction * (m_norm / d_norm.clamp_min(tiny)).to(direction.dtype)
