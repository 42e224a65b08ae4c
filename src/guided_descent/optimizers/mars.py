"""MARS-AdamW: AdamW on a variance-reduced gradient (Yuan et al. 2024, arXiv 2411.10438).

Update rule at step ``t`` (from 1), for gradient ``g_t`` and the previous step's ``g_{t-1}``;
state ``m``, ``v``, ``last_grad`` in float32::

    c = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_{t-1})    # the corrected gradient
    c = c / max(‖c‖₂, 1)                                         # clipped to norm 1, per tensor
    m = beta1 * m + (1 - beta1) * c
    v = beta2 * v + (1 - beta2) * c²
    p = p - lr * (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p)
    last_grad = g_t

**The approximate variant.** The paper's exact MARS corrects with ``∇f(x_t, ξ_t) − ∇f(x_{t−1},
ξ_t)``: the gradient at the previous iterate *on the current batch*, a second gradient
evaluation per step. MARS-approx, which the paper's language-model experiments use and which
this class implements, takes the previous step's gradient ``∇f(x_{t−1}, ξ_{t−1})`` instead: one
gradient per step and one extra buffer (``last_grad``). ``gamma`` scales the correction
(``gamma = 0`` is AdamW on the norm-clipped gradient); the norm clipping is the paper's, taken
over each parameter tensor.

**Compared with the references** (the official code, AGI-Arena/MARS ``mars.py``, and
pytorch_optimizer's ``MARS``):

* *The first step.* No previous gradient exists at t = 1. The official code takes it as zero,
  so its first corrected gradient is ``(1 + gamma·beta1/(1 − beta1)) g_1`` (1.475 g_1 at the
  defaults) and that inflated value enters ``v``. We follow the paper's algorithm, which starts
  from ``x_0 = x_1`` so that the correction vanishes: ``c_1 = g_1`` (then clipped).
* *Which parameters.* The official code applies MARS to 2-D parameters only and AdamW, with its
  own ``lr_1d``, ``betas_1d`` and ``weight_decay_1d``, to the rest (``optimize_1d=False``).
  This class applies MARS to every parameter it is given (``optimize_1d=True`` there); which
  parameters go to which optimizer is routing's business, not this rule's.
* The bias corrections and ``eps`` sit where torch's AdamW puts them; the official
  ``m / ((sqrt(v) / sqrt(1 − beta2^t) + eps) · (1 − beta1^t))`` is the same expression.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guided_descent.optimizers.elementwise import (
    ElementwiseOptimizer,
    advance_,
    ema_sq_,
    lerp_,
    select,
)
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.transforms.descend import descend_, step_rms
from guided_descent.transforms.masking import bias_correction, commit_


def mars(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    last_grads: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    ok: Tensor | None = None,
) -> list[Tensor]:
    """Apply one MARS-AdamW (approximate) step in place (functional form; see the module
    docstring).

    ``exp_avgs``, ``exp_avg_sqs``: float32 (float64 for float64 parameters); ``last_grads``:
    the gradients' dtype; each the shape of its parameter. ``steps``: 0-d float32 counters (0
    before the first step, where ``last_grads`` is not yet a gradient). ``ok`` (a 0-d bool
    tensor) keeps the step only where true, without a host sync. Returns the RMS of each
    parameter's step (weight decay excluded) as 0-d tensors.
    """
    scale = gamma * beta1 / (1.0 - beta1)
    norms = []
    for p, grad, m, v, last, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, last_grads, steps, strict=True
    ):
        g = grad.to(m.dtype)  # (p.shape) float32
        if maximize:
            g = -g
        # No correction on the first step (step == 0): the paper's x_0 = x_1.
        coef = select(step > 0, scale, 0.0, like=m)
        c = torch.lerp(g, last.to(g.dtype), -coef)  # g + coef * (g - last), one kernel
        # Clip to norm 1: dividing by max(‖c‖, 1) is the identity, exactly, below norm 1.
        c = c / torch.linalg.vector_norm(c).clamp(min=1.0)
        t = advance_(step, ok)
        lerp_(m, c, 1.0 - beta1, ok)
        ema_sq_(v, c, beta2, ok)
        commit_(last, g, ok)
        denom = (v.sqrt() / bias_correction(beta2, t) ** 0.5).add_(eps)
        update = (m / bias_correction(beta1, t)).div_(denom)
        descend_(p, update, lr, weight_decay, ok)
        norms.append(step_rms(update, lr))
    return norms


class MARS(ElementwiseOptimizer):
    """MARS-AdamW (approximate), Yuan, Liu, Wu, Zhou & Gu 2024, arXiv 2411.10438.

    Args:
        params: parameters or param-group dicts.
        lr: step size. Default 3e-3 (the official code's).
        betas: ``(beta1, beta2)``: decay of the first and second moments of the corrected
            gradient. Default (0.95, 0.99).
        gamma: strength of the variance-reduction correction. Default 0.025.
        eps: added to ``sqrt(v̂)`` (as in Adam). Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr`` (as in AdamW). Default 0.
        maximize: ascend instead of descend.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"`` (see
            :mod:`guided_descent.optimizers.guard`).

    State per parameter: ``exp_avg`` and ``exp_avg_sq`` in float32 (float64 for float64
    parameters), ``last_grad`` (the previous step's gradient) in the gradient's own dtype, which
    holds it exactly, each the parameter's shape; and ``step``.
    """

    STATE_NAME = "MARS"
    RULE = staticmethod(mars)
    HYPER = {k: k for k in ("gamma", "eps", "weight_decay")}
    BUFFERS = ("exp_avg", "exp_avg_sq", "last_grad")
    GRADIENT_COPIES = ("last_grad",)

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        gamma: float = 0.025,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(lr=lr, betas=tuple(betas), gamma=gamma, eps=eps, weight_decay=weight_decay)
        self._setup("mars", params, hyper, maximize, on_nonfinite)


SPEC = register(
    OptimizerSpec(
        name="mars",
        family="adaptive",
        rule="AdamW on c = clip(g + gamma*b1/(1-b1)*(g - g_prev), norm 1) "
        "(variance reduction with the previous step's gradient)",
        state="2x float32 (first and second moments) + 1x in the gradient's dtype (previous "
        "gradient)",
        state_buffers=3.0,
        reference="Yuan et al. 2024, arXiv 2411.10438",
        factory=MARS,
        defaults=dict(lr=3e-3, betas=(0.95, 0.99), gamma=0.025, eps=1e-8),
    )
)
