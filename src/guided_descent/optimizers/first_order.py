"""First-order optimizers, registered straight from ``torch.optim`` (not re-implemented).

Defaults follow the lecture where it gives them (Adam: lr 1e-3, betas (0.9, 0.999), eps 1e-8;
momentum 0.9; Lion: lr 1e-4, betas (0.9, 0.99)); SGD's learning rate 0.1 is the one the ``moons``
protocol uses; everything else keeps torch's defaults.
"""

from __future__ import annotations

import torch

from guided_descent.optimizers.lion import Lion
from guided_descent.optimizers.registry import OptimizerSpec, register


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
) -> torch.optim.SGD:
    """Polyak's heavy ball as ``torch.optim.SGD``: ``v = momentum*v + g; p -= lr*v``."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=False,
        maximize=maximize,
        foreach=foreach,
        fused=fused,
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
) -> torch.optim.SGD:
    """Nesterov's accelerated gradient as ``torch.optim.SGD(nesterov=True)``."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=True,
        maximize=maximize,
        foreach=foreach,
        fused=fused,
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
        factory=torch.optim.SGD,
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
        factory=torch.optim.Adagrad,
        torch_native=True,
    ),
    OptimizerSpec(
        name="rmsprop",
        family="adaptive",
        rule="v = a*v + (1-a)*g^2; p -= lr * g / (sqrt(v) + eps)",
        state="1x (square average)",
        state_buffers=1.0,
        reference="Tieleman & Hinton 2012 (Coursera lecture 6.5)",
        factory=torch.optim.RMSprop,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adam",
        family="adaptive",
        rule="m, v = EMAs of g, g^2; p -= lr * m_hat / (sqrt(v_hat) + eps)",
        state="2x (first and second moments)",
        state_buffers=2.0,
        reference="Kingma & Ba 2015, arXiv 1412.6980",
        factory=torch.optim.Adam,
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
        factory=torch.optim.AdamW,
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
        factory=torch.optim.NAdam,
        torch_native=True,
    ),
    OptimizerSpec(
        name="adafactor",
        family="adaptive",
        rule="RMS step with a rank-1 (row x column) second-moment estimate",
        state="O(m+n) per m x n matrix; 1x for vectors",
        state_buffers=0.0,
        reference="Shazeer & Stern 2018, arXiv 1804.04235",
        factory=torch.optim.Adafactor,
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
