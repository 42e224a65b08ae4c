"""ADOPT: Adam that normalises by the *previous* second moment (Taniguchi et al. 2024,
arXiv 2411.02853), with the clipping the authors recommend.

Update rule, for gradients ``g_0, g_1, ...``; state ``m``, ``v`` in float32::

    step 0:  v = g_0²                                    # only measures: p does not move
    step t:  n = clip(g_t / max(sqrt(v), eps), t**clip_exponent)   # v from *before* g_t
             m = beta1 * m + (1 - beta1) * n
             p = p - lr * (m + weight_decay * p)
             v = beta2 * v + (1 - beta2) * g_t²          # second moment updated after use

``clip(x, c)`` clamps every entry to ``[-c, c]``. Normalising ``g_t`` by a second moment that does
not contain it removes the correlation that lets Adam diverge for small ``beta2``; putting the
normalisation before the momentum (rather than after, as Adam does) is the paper's other
change. There is no bias correction (``m`` starts at 0, ``v`` at ``g_0²``).

**Clipping.** The authors found ADOPT unstable early where gradients are near zero at
initialisation (``g / sqrt(v)`` is then huge) and added the clip with a bound growing as
``t**(1/4)``, which keeps the convergence guarantee (paper v3; official code since Nov 2024).
``clip_exponent=None`` gives the original, unclipped ADOPT.

**Compared with the references.** The step count, the clipping bound and ``eps`` (a floor on
``sqrt(v)``, not a term added to it) follow the official code (iShohei220/adopt): the first
momentum update is ``t = 1`` with bound ``1``, and decoupled weight decay is not applied on step 0.
pytorch_optimizer 4.1.0 counts the measuring step too (bound ``2**(1/4)`` at the first update)
and decays on step 0; our tests pin both differences. Weight decay here is always decoupled
(AdamW's ``p -= lr * weight_decay * p``); the official class adds it to the gradient unless
``decouple=True``, which its README recommends for AdamW users.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guided_descent.optimizers.elementwise import ElementwiseOptimizer, lerp_, select
from guided_descent.optimizers.registry import OptimizerSpec, register
from guided_descent.transforms.descend import step_rms
from guided_descent.transforms.masking import commit_, count_


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exponent: float | None,
    weight_decay: float,
    maximize: bool = False,
    ok: Tensor | None = None,
) -> list[Tensor]:
    """Apply one ADOPT step in place (functional form; see the module docstring).

    ``exp_avgs``, ``exp_avg_sqs``: float32 (float64 for float64 parameters), each the shape of
    its parameter; ``steps``: 0-d float32 counters, 0 on the measuring step. The measuring step
    is handled with 0-d tensors (no host read of the counter), so ``ok`` (a 0-d bool tensor)
    can keep the step only where true without a host sync. Returns the RMS of each parameter's
    step (weight decay excluded) as 0-d tensors.
    """
    norms = []
    for p, grad, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        g = grad.to(m.dtype)  # (p.shape) float32
        if maximize:
            g = -g
        t = step.clone()  # this step's number: 0 for the measuring step
        count_(step, ok)
        measuring = t == 0
        n = g / v.sqrt().clamp_(min=eps)  # v = 0 on the measuring step: n = g / eps
        if clip_exponent is not None:
            bound = t.to(m.dtype).pow(clip_exponent)  # at t = 0: 0 (or 1 for exponent 0)
            n = n.clamp_(-bound, bound)
        else:  # unclipped, g / eps could overflow on the measuring step, and 0 * inf is NaN
            n = torch.where(measuring, 0.0, n)
        # On the measuring step m must stay 0 and p must not move: weight 0 for m, and p's
        # decay factor 1 and update m = 0 (exactly representable: p is left bit-identical).
        lerp_(m, n, select(measuring, 0.0, 1.0 - beta1, like=m), ok)
        update = m
        decay = select(measuring, 1.0, 1.0 - lr * weight_decay, like=m)
        new_p = p.to(m.dtype).mul(decay).add_(update, alpha=-lr)
        commit_(p, new_p, ok)
        # v after its use; on the measuring step it becomes g_0² (weight 1: lerp returns end).
        lerp_(v, g * g, select(measuring, 1.0, 1.0 - beta2, like=v), ok)
        norms.append(step_rms(update, lr))
    return norms


class ADOPT(ElementwiseOptimizer):
    """ADOPT, Taniguchi et al. 2024 (NeurIPS), arXiv 2411.02853.

    Args:
        params: parameters or param-group dicts.
        lr: step size. Default 1e-3.
        betas: ``(beta1, beta2)``: decay of the momentum of normalised gradients and of the
            second moment. Default (0.9, 0.9999): ADOPT converges for any ``beta2``.
        eps: floor on ``sqrt(v)``. Default 1e-6.
        clip_exponent: normalised gradients are clipped to ``±t**clip_exponent`` at step ``t``;
            ``None``: no clipping (the original ADOPT). Default 0.25.
        weight_decay: decoupled weight decay, multiplied by ``lr`` (as in AdamW). Default 0.
        maximize: ascend instead of descend.
        on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"`` (see
            :mod:`guided_descent.optimizers.guard`).

    State per parameter: ``exp_avg``, ``exp_avg_sq``, each the parameter's shape in float32
    (float64 for float64 parameters), and ``step``. The first step only measures ``v``.
    """

    STATE_NAME = "ADOPT"
    RULE = staticmethod(adopt)
    HYPER = {k: k for k in ("eps", "clip_exponent", "weight_decay")}
    BUFFERS = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_exponent: float | None = 0.25,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        hyper = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            clip_exponent=clip_exponent,
            weight_decay=weight_decay,
        )
        self._setup("adopt", params, hyper, maximize, on_nonfinite)
        if not eps > 0:  # a floor on sqrt(v): at 0, a coordinate whose gradients were 0 gives 0/0
            raise ValueError(f"adopt: eps must be > 0 (it floors sqrt(v)), got {eps!r}")


SPEC = register(
    OptimizerSpec(
        name="adopt",
        family="adaptive",
        rule="m = EMA(clip(g / max(sqrt(v_prev), eps), t^0.25)); p -= lr*m; "
        "then v = EMA(g²)  (first step only sets v = g²)",
        state="2x float32 (momentum, second moment)",
        state_buffers=2.0,
        reference="Taniguchi et al. 2024, arXiv 2411.02853",
        factory=ADOPT,
        defaults=dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, clip_exponent=0.25),
    )
)
