"""Lion against a plain reference written from the paper's pseudo-code (arXiv 2302.06675)."""

from __future__ import annotations

import pytest
import torch

import guided_descent as gd
from guided_descent.optimizers.lion import Lion


def reference_lion(params, grads_per_step, lr, betas, weight_decay, maximize=False):
    """Per-tensor Lion in float64, one line per line of the paper's algorithm."""
    beta1, beta2 = betas
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double() * (-1.0 if maximize else 1.0)
            c = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] - lr * (torch.sign(c) + weight_decay * theta[i])
            m[i] = beta2 * m[i] + (1 - beta2) * g
    return theta


def random_problem(dtype, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (7,), (5, 3), (2, 3, 2, 2)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def run_lion(params, grads_per_step, **hp):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Lion(ps, **hp)
    for grads in grads_per_step:
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_lion_matches_reference_float32(foreach, weight_decay, maximize):
    params, grads = random_problem(torch.float32)
    hp = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
    ours, _ = run_lion(params, grads, foreach=foreach, maximize=maximize, **hp)
    ref = reference_lion(params, grads, maximize=maximize, **hp)
    for p, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_matches_reference_bfloat16(foreach):
    # bf16 has 8 bits of mantissa: the sign is exact except where c is within rounding of 0,
    # and each coordinate moves by lr rounded to bf16, so compare with bf16's resolution.
    params, grads = random_problem(torch.bfloat16, steps=4)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    ours, opt = run_lion(params, grads, foreach=foreach, **hp)
    ref = reference_lion(params, grads, **hp)
    for p, r in zip(ours, ref, strict=True):
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach().double(), r, rtol=2e-2, atol=2e-2)


def test_foreach_and_single_tensor_paths_agree_exactly():
    params, grads = random_problem(torch.float32, steps=5, seed=3)
    a, _ = run_lion(params, grads, lr=1e-3, weight_decay=0.05, foreach=False)
    b, _ = run_lion(params, grads, lr=1e-3, weight_decay=0.05, foreach=True)
    for x, y in zip(a, b, strict=True):
        # Elementwise kernels with and without vectorization may fuse a multiply-add or not:
        # one float32 rounding apart at most (a sign of c flipping would need |c| within one
        # rounding of 0, which random data does not hit).
        torch.testing.assert_close(x, y, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_every_coordinate_moves_by_exactly_lr_without_weight_decay():
    params, grads = random_problem(torch.float64, steps=1)
    ours, _ = run_lion(params, grads, lr=0.25)
    for p0, p1 in zip(params, ours, strict=True):
        moved = (p1.detach() - p0).abs()
        torch.testing.assert_close(moved, torch.full_like(moved, 0.25))


def test_first_step_is_minus_lr_sign_grad():
    # With m = 0, c = (1 - beta1) g, so the first update is -lr * sign(g) for any beta1 < 1.
    p = torch.nn.Parameter(torch.zeros(6))
    p.grad = torch.tensor([1.0, -2.0, 0.0, 3.0, -1e-9, 1e-9])
    Lion([p], lr=0.5, betas=(0.5, 0.9)).step()
    assert p.detach().tolist() == [-0.5, 0.5, 0.0, -0.5, 0.5, -0.5]


def test_registry_defaults_are_the_lectures():
    opt = gd.create("lion", [torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert group["lr"] == 1e-4 and group["betas"] == (0.9, 0.99)
    assert isinstance(opt, Lion)


@pytest.mark.parametrize(
    "hp, match",
    [
        (dict(lr=-1e-4), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_lion_constructor_validates(hp, match):
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **hp)
