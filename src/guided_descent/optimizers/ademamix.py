"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA (Pagliardini et al. 2024,
arXiv 2409.03137, Algorithm 1).

Update rule at step ``t`` (from 1), for gradient ``g``; state ``m1``, ``m2``, ``v`` in float32::

    m1 = beta1 * m1 + (1 - beta1) * g                 # fast EMA (as Adam's first moment)
    m2 = beta3(t) * m2 + (1 - beta3(t)) * g           # slow EMA, beta3 ~ 0.9999: no bias correction
    v  = beta2 * v  + (1 - beta2) * g²
    p  = p - lr * ((m1 / (1 - beta1^t) + alpha(t) * m2) / (sqrt(v / (1 - beta2^t)) + eps)
                   + weight_decay * p)

**The warm-ups are part of the method.** A slow EMA with a large ``alpha`` destabilises the first
steps, so the paper ramps ``alpha`` and ``beta3`` up from the step count kept in the optimizer
(``alpha_warmup`` = T_α, ``beta3_warmup`` = T_β3; the paper sets both to the total number of
steps T). These schedule the method's coefficients, not the learning rate, which stays outside
``step`` (DESIGN rule 3)::

    alpha(t) = alpha * min(t / T_α, 1)
    beta3(t) = min(exp(ln(beta1) ln(beta3) / ((1 - a) ln(beta3) + a ln(beta1))), beta3),
               a = min(t / T_β3, 1)

``beta3(t)`` interpolates linearly between the *half-lives* ``ln(0.5) / ln(beta)`` of ``beta1``
(at t = 0) and ``beta3`` (at T_β3); it is computed in that form (identical in exact arithmetic),
which also holds for ``beta1 = 0`` (half-life 0).

**Compared with the references.** The rule above is the paper's and the official code's
(apple/ml-ademamix); the tests check it against both written out, pytorch_optimizer and heavyball.

* The official scheduler takes ``ln(beta + 1e-8)`` where the paper takes ``ln(beta)``, which
  lengthens beta3's half-life by 1e-4 (relative) for beta3 = 0.9999: during the warm-up its
  ``1 - beta3(t)`` is up to ~1e-4 (relative) smaller. We follow the paper, as pytorch_optimizer
  does; heavyball copies the official scheduler.
* heavyball floors ``sqrt(v̂)`` at ``eps`` (``max(sqrt(v̂), eps)``) where the paper adds it.
* The official class skips the fast EMA's buffer when ``beta1 = 0``; ours always keeps it.
* Argument names: the official ``betas`` triple is ``betas=(beta1, beta2)`` plus ``beta3``
  here, and ``alpha`` is ``alpha_slow``, because in this library a key means one thing in every
  optimizer (``betas`` is Adam's pair, ``alpha`` RMSprop's smoothing constant in [0, 1)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guided_descent.optimizers.elementwise import (
    ElementwiseOptimizer,
    advance_,
    ema_sq_,
    lerp_,
)
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.transforms.descend import descend_, step_rms
from guided_descent.transforms.masking import bias_correction


def half_life(beta: float) -> float:
    """Steps after which ``beta**steps`` is 1/2: ``ln(0.5) / ln(beta)``; 0 for ``beta = 0``."""
    return math.log(0.5) / math.log(beta) if beta > 0.0 else 0.0


def ademamix_alpha(t: Tensor, alpha: float, warmup: int | None) -> float | Tensor:
    """``alpha(t)``: linear from 0 at t = 0 to ``alpha`` at ``t = warmup`` (``None``: constant)."""
    if warmup is None:
        return alpha
    return alpha * (t.to(torch.float64) / warmup).clamp(max=1.0)


def ademamix_beta3(t: Tensor, beta1: float, beta3: float, warmup: int | None) -> float | Tensor:
    """``beta3(t)``: the half-life interpolated linearly from ``beta1``'s at t = 0 to ``beta3``'s at
    ``t = warmup``, capped at ``beta3`` (``None``: constant). float64, on ``t``'s device."""
    if warmup is None:
        return beta3
    a = (t.to(torch.float64) / warmup).clamp(max=1.0)
    hl = (1.0 - a) * half_life(beta1) + a * half_life(beta3)  # > 0 for t >= 1
    return torch.exp(math.log(0.5) / hl).clamp(max=beta3)


def ademamix(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_slows: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    alpha_warmup: int | None,
    beta3_warmup: int | None,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    ok: Tensor | None = None,
) -> list[Tensor]:
    """Apply one AdEMAMix step in place (functional form; see the module docstring).

    ``exp_avgs`` (m1), ``exp_avg_slows`` (m2), ``exp_avg_sqs`` (v): float32 (float64 for float64
    parameters), each the shape of its parameter; ``steps``: 0-d float32 counters. ``ok`` (a 0-d
    bool tensor) keeps the step only where true, without a host sync. Returns the RMS of each
    parameter's step (weight decay excluded) as 0-d tensors.
    """
    norms = []
    for p, grad, m1, m2, v, step in zip(
        params, grads, exp_avgs, exp_avg_slows, exp_avg_sqs, steps, strict=True
    ):
        g = grad.to(m1.dtype)  # (p.shape) float32: a bfloat16 gradient enters the EMAs promoted
        if maximize:
            g = -g
        t = advance_(step, ok)
        b3 = ademamix_beta3(t, beta1, beta3, beta3_warmup)
        lerp_(m1, g, 1.0 - beta1, ok)
        lerp_(m2, g, (1.0 - b3).to(m2.dtype) if isinstance(b3, Tensor) else 1.0 - b3, ok)
        ema_sq_(v, g, beta2, ok)
        denom = (v.sqrt() / bias_correction(beta2, t) ** 0.5).add_(eps)
        mix = m1 / bias_correction(beta1, t) + ademamix_alpha(t, alpha, alpha_warmup) * m2
        update = mix.div_(denom)
        descend_(p, update, lr, weight_decay, ok)
        norms.append(step_rms(update, lr))
    return norms


class AdEMAMix(ElementwiseOptimizer):
    """AdEMAMix, Pagliardini, Ablin & Grangier 2024, arXiv 2409.03137.

    Args:
        params: parameters or param-group dicts.
        lr: step size. Default 1e-3.
        betas: ``(beta1, beta2)``: decay of the fast EMA and of the second moment, as in Adam.
            Default (0.9, 0.999).
        beta3: decay of the slow EMA. Default 0.9999.
        alpha_slow: the paper's ``alpha``, weight of the slow EMA in the update. Default 8 (the
            official README's setting for language models).
        alpha_warmup: steps over which ``alpha_slow`` ramps up linearly from 0; ``None``: no ramp.
        beta3_warmup: steps over which ``beta3`` ramps up (in half-life) from ``beta1``;
            ``None``: no ramp. The paper sets both warm-ups to the run's total number of steps;
            without them a large ``alpha`` with ``beta3`` near 1 can be unstable early.
        eps: added to ``sqrt(v̂)`` (as in Adam). Default 1e-8.
        weight_decay: decoupled weight decay, multiplied by ``lr`` (as in AdamW). Default 0.
        maximize: ascend instead of descend.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"`` (see
            :mod:`guided_descent.optimizers.guard`).

    State per parameter: ``exp_avg`` (m1), ``exp_avg_slow`` (m2), ``exp_avg_sq`` (v), each the
    parameter's shape in float32 (float64 for float64 parameters), and ``step``.
    """

    STATE_NAME = "AdEMAMix"
    RULE = staticmethod(ademamix)
    HYPER = {
        "beta3": "beta3",
        "alpha": "alpha_slow",
        "alpha_warmup": "alpha_warmup",
        "beta3_warmup": "beta3_warmup",
        "eps": "eps",
        "weight_decay": "weight_decay",
    }
    BUFFERS = ("exp_avg", "exp_avg_slow", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.9999,
        alpha_slow: float = 8.0,
        alpha_warmup: int | None = None,
        beta3_warmup: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(
            lr=lr,
            betas=tuple(betas),
            beta3=beta3,
            alpha_slow=alpha_slow,
            alpha_warmup=alpha_warmup,
            beta3_warmup=beta3_warmup,
            eps=eps,
            weight_decay=weight_decay,
        )
        if beta3 is None:  # the shared check accepts None (Prodigy's default); AdEMAMix does not
            raise ValueError("ademamix: beta3 (the slow EMA's decay) must be in [0, 1), got None")
        self._setup("ademamix", params, hyper, maximize, on_nonfinite)


SPEC = register(
    OptimizerSpec(
        name="ademamix",
        family="adaptive",
        rule="Adam whose numerator mixes a fast and a slow EMA: "
        "p -= lr * (m̂1 + alpha*m2) / (sqrt(v̂) + eps); alpha, beta3 warm up with the step",
        state="3x float32 (fast EMA, slow EMA, second moment)",
        state_buffers=3.0,
        reference="Pagliardini, Ablin & Grangier 2024, arXiv 2409.03137",
        factory=AdEMAMix,
        defaults=dict(lr=1e-3, betas=(0.9, 0.999), beta3=0.9999, alpha_slow=8.0, eps=1e-8),
    )
)
