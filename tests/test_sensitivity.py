"""The Kronecker methods at their defaults are well-posed: their steps are smooth in the gradient.

Feed a model the same batch as one batch or as two accumulated halves (gradients equal up to
float rounding), or perturb every gradient entry by a relative 1e-7: a first-order method's
trajectory moves by about that much (AdamW measured 5e-7 relative displacement, Muon 5e-6). At
their old defaults Shampoo and SOAP moved by 20-60 %: early Kronecker factors are rank-deficient,
and an absolute damping of 1e-12 (Shampoo) or an eigenbasis chosen arbitrarily inside a null
space (SOAP) turned rounding into direction. Results then depended on the machine, on DDP and on
accumulation. Each Kronecker method must now keep the displacement within 1e-3 after 10 and 30
steps, on two architectures.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_descent as gd

KRONECKER = ("shampoo", "soap", "kfac", "kl_shampoo", "kl_soap", "psgd_kron")
LIMIT = 1e-3  # relative change of the displacement after the steps
NOISE = 1e-7  # relative perturbation of every gradient entry, about one float32 rounding


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    )


MODELS = {"mlp": (mlp, (20,)), "cnn": (cnn, (1, 6, 6))}


def displacement(name: str, model_name: str, steps: int, mode: str) -> torch.Tensor:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = gd.create(name, model)
    data = torch.Generator().manual_seed(7)
    noise = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(32, *shape, generator=data)
        y = torch.randint(0, 5, (32,), generator=data)
        opt.zero_grad()
        if mode == "halves":
            for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
                (F.cross_entropy(model(xs), ys) / 2).backward()
        else:
            F.cross_entropy(model(x), y).backward()
            if mode == "noise":
                for p in model.parameters():
                    p.grad.mul_(1 + NOISE * torch.randn(p.grad.shape, generator=noise))
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - start


# K-FAC on the small ReLU CNN: smooth for 10 steps (halves 4e-6), not by 30 (noise 6e-6, halves
# 2e-2) at the default damping 1e-3, while the KL clip bounds its steps. Measured (2026-12-06): the
# halves run departs at one step (22: 6e-6 -> 2e-4; the half-batch forward rounds differently and
# a ReLU input near 0 flips, so the gradient jumps) and the gap then grows ~1.8x per step; with
# Tanh instead of ReLU both modes stay below 1e-5 at 30 steps. The growth is K-FAC's trajectory,
# not its statistics (the factors and inverses of the two runs agree to 1e-6 at steps 1-21): a
# 1e-6 relative change of the initial weights moves K-FAC's 30-step displacement by 1e-1
# (AdamW 1e-5, Muon 3e-6). Damping 3e-3 brings it to 4e-6 but costs 2.4x on kron-quadratic and
# 1.9x on digits-autoencoder (3 seeds each), and without the clip K-FAC diverges. Kept at the
# better-training default and marked here, strictly, so that a fix shows.
KNOWN = {("kfac", 30, "cnn")}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("name", KRONECKER)
def test_steps_are_smooth_in_the_gradient(name, steps, model_name, request):
    if (name, steps, model_name) in KNOWN:
        reason = "K-FAC's trajectory on a ReLU CNN is chaotic by 30 steps (see KNOWN)"
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    base = displacement(name, model_name, steps, "whole")
    for mode in ("noise", "halves"):
        other = displacement(name, model_name, steps, mode)
        change = ((other - base).norm() / base.norm()).item()
        assert change <= LIMIT, f"{name} {mode}: {change:.1e}"
