"""First-order optimizers, registered straight from ``torch.optim`` (not re-implemented).

Each name builds a real ``torch.optim`` object: the classes below are ``torch.optim.SGD``,
``torch.optim.Adam``, ... with the library's guard mixed in once per class
(:func:`guided_descent.optimizers.guard.guarded`): ``isinstance(opt, torch.optim.Adam)`` holds, the
update is torch's own ``step`` (fused/foreach kernels included), and the extra keyword
``on_nonfinite`` chooses what a step with NaN/Inf gradients does.

Defaults follow the lecture where it gives them (Adam: lr 1e-3, betas (0.9, 0.999), eps 1e-8;
momentum 0.9; Lion: lr 1e-4, betas (0.9, 0.99)); SGD's learning rate 0.1 is the one the ``moons``
protocol uses; everything else keeps torch's defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guided_descent.optimizers.diagnostics import (
    adafactor_step_rms,
    adagrad_step_rms,
    adam_step_rms,
    nadam_step_rms,
    rmsprop_step_rms,
    sgd_step_rms,
)
from guided_descent.optimizers.guard import guarded, param_shaped
from guided_descent.optimizers.lion import Lion
from guided_descent.optimizers.registry import OptimizerSpec, register


def _adafactor_shapes(p: Tensor) -> dict[str, tuple[int, ...]]:
    shape = tuple(p.shape)
    if p.dim() > 1:  # torch factors the last two dimensions
        return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
    return {"variance": shape}


_ADAM_STATE = param_shaped("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

SGD = guarded(
    torch.optim.SGD,
    module=__name__,
    state_shapes=param_shaped("momentum_buffer"),
    step_rms=sgd_step_rms,
)
Adagrad = guarded(
    torch.optim.Adagrad,
    module=__name__,
    state_shapes=param_shaped("sum"),
    step_rms=adagrad_step_rms,
)
RMSprop = guarded(
    torch.optim.RMSprop,
    module=__name__,
    state_shapes=param_shaped("square_avg", "momentum_buffer", "grad_avg"),
    step_rms=rmsprop_step_rms,
)
Adam = guarded(torch.optim.Adam, module=__name__, state_shapes=_ADAM_STATE, step_rms=adam_step_rms)
AdamW = guarded(
    torch.optim.AdamW, module=__name__, state_shapes=_ADAM_STATE, step_rms=adam_step_rms
)
NAdam = guarded(
    torch.optim.NAdam,
    module=__name__,
    state_shapes=param_shaped("exp_avg", "exp_avg_sq"),
    step_rms=nadam_step_rms,
)
Adafactor = guarded(
    torch.optim.Adafactor,
    module=__name__,
    state_shapes=_adafactor_shapes,
    step_rms=adafactor_step_rms,
)


def heavy_ball(
    params,
    lr: float = 0.1,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    on_nonfinite: str = "skip",
) -> torch.optim.SGD:
    """Polyak's heavy ball as ``torch.optim.SGD``: ``v = momentum*v + g; p -= lr*v``."""
    return SGD(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=False,
        maximize=maximize,
        foreach=foreach,
        fused=fused,
        on_nonfinite=on_nonfinite,
    )


def nesterov(
    params,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    on_nonfinite: str = "skip",
) -> torch.optim.SGD:
    """Nesterov's accelerated gradient as ``torch.optim.SGD(nesterov=True)``."""
    return SGD(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=True,
        maximize=maximize,
        foreach=foreach,
        fused=fused,
        on_nonfinite=on_nonfinite,
    )


_ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)

SPECS = (
    OptimizerSpec(
        name="sgd",
        family="sgd",
        rule="p -= lr * g",
        state="none",
        state_buffers=0.0,
        reference="Robbins & Monro 1951",
        factory=SGD,
        defaults=dict(lr=0.1),
        torch_native=True,
    ),
    OptimizerSpec(
        name="momentum",
        family="sgd",
        rule="v = mu*v + g; p -= lr * v  (heavy ball)",
        state="1x (velocity)",
        state_buffers=1.0,
        reference="Polyak 1964",
        factory=heavy_ball,
        torch_native=True,
    ),
    OptimizerSpec(
        name="nesterov",
        family="sgd",
        rule="v = mu*v + g; p -= lr * (g + mu*v)  (look-ahead)",
        state="1x (velocity)",
        state_buffers=1.0,
        reference="Nesterov 1983; Sutskever et al. 2013",
        factory=nesterov,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adagrad",
        family="adaptive",
        rule="s += g^2; p -= lr * g / (sqrt(s) + eps)",
        state="1x (sum of squares)",
        state_buffers=1.0,
        reference="Duchi, Hazan & Singer 2011 (JMLR 12)",
        factory=Adagrad,
        torch_native=True,
    ),
    OptimizerSpec(
        name="rmsprop",
        family="adaptive",
        rule="v = a*v + (1-a)*g^2; p -= lr * g / (sqrt(v) + eps)",
        state="1x (square average)",
        state_buffers=1.0,
        reference="Tieleman & Hinton 2012 (Coursera lecture 6.5)",
        factory=RMSprop,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adam",
        family="adaptive",
        rule="m, v = EMAs of g, g^2; p -= lr * m_hat / (sqrt(v_hat) + eps)",
        state="2x (first and second moments)",
        state_buffers=2.0,
        reference="Kingma & Ba 2015, arXiv 1412.6980",
        factory=Adam,
        defaults=_ADAM,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adamw",
        family="adaptive",
        rule="Adam step, then p -= lr * wd * p  (decoupled weight decay)",
        state="2x (first and second moments)",
        state_buffers=2.0,
        reference="Loshchilov & Hutter 2019, arXiv 1711.05101",
        factory=AdamW,
        defaults={**_ADAM, "weight_decay": 0.01},
        torch_native=True,
    ),
    OptimizerSpec(
        name="nadam",
        family="adaptive",
        rule="Adam with a Nesterov look-ahead on the first moment",
        state="2x (first and second moments)",
        state_buffers=2.0,
        reference="Dozat 2016 (ICLR workshop)",
        factory=NAdam,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adafactor",
        family="adaptive",
        rule="RMS step with a rank-1 (row x column) second-moment estimate",
        state="O(m+n) per m x n matrix; 1x for vectors",
        state_buffers=0.0,
        reference="Shazeer & Stern 2018, arXiv 1804.04235",
        factory=Adafactor,
        torch_native=True,
    ),
    OptimizerSpec(
        name="lion",
        family="sign",
        rule="p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g",
        state="1x (momentum)",
        state_buffers=1.0,
        reference="Chen et al. 2023, arXiv 2302.06675",
        factory=Lion,
    ),
)

for _spec in SPECS:
    register(_spec)
