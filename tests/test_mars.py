"""MARS-AdamW (approximate) against the paper's algorithm written out in float64, torch's AdamW
(gamma = 0) and pytorch_optimizer's ``MARS`` (arXiv 2411.10438)."""

from __future__ import annotations

import pytest
import torch
from elementwise_problem import (
    SHAPES,
    adam_update_bound,
    assert_close_by,
    bf16_ulp,
    drift_bound,
    max_abs,
    problem,
    run,
)

import guided_descent as gd
from guided_descent.optimizers.mars import MARS

BETAS, GAMMA = (0.95, 0.99), 0.025
# Roundings of one update in one computation: the correction (3), the norm of at most N squares
# and its division (N/2 + 3: a sum of N terms errs by N·u relative, its square root by half),
# two EMAs, sqrt, two bias corrections, the division, decay and step.
N = max(torch.Size(s).numel() for s in SHAPES)
ROUNDINGS = 24 + N


def reference_mars(
    params,
    grads_per_step,
    *,
    lr,
    betas=BETAS,
    gamma=GAMMA,
    eps=1e-8,
    weight_decay=0.0,
    maximize=False,
    first_previous="current",
    peer_denominator=False,
    round_to=None,
):
    """MARS-AdamW with the approximate correction (the paper's Algorithms 1 and 2) in float64.

    ``first_previous``: the "previous gradient" at t = 1: ``"current"`` (the paper's x_0 = x_1:
    no correction) or ``"zero"`` (the official code and pytorch_optimizer).
    ``peer_denominator``: pytorch_optimizer's ``(sqrt(v + 1e-15) + eps) / sqrt(1 − beta2^t)``
    instead of ``sqrt(v̂) + eps``. Returns the parameters, the state (m, v, last gradient) per
    parameter and the smallest entry of v seen.
    """
    beta1, beta2 = betas
    theta = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    last = [torch.zeros_like(t) for t in theta]
    v_min = float("inf")
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = -g.double() if maximize else g.double()
            previous = g if t == 1 and first_previous == "current" else last[i]
            c = g + gamma * beta1 / (1 - beta1) * (g - previous)
            norm = c.norm()
            if norm > 1:
                c = c / norm
            m[i] = beta1 * m[i] + (1 - beta1) * c
            v[i] = beta2 * v[i] + (1 - beta2) * c * c
            v_min = min(v_min, float(v[i].min()) if v[i].numel() else v_min)
            if peer_denominator:
                denom = ((v[i] + 1e-15).sqrt() + eps) / (1 - beta2**t) ** 0.5
            else:
                denom = (v[i] / (1 - beta2**t)).sqrt() + eps
            update = m[i] / (1 - beta1**t) / denom
            theta[i] = theta[i] - lr * (update + weight_decay * theta[i])
            if round_to is not None:
                theta[i] = theta[i].to(round_to).double()
            last[i] = g
    return theta, list(zip(m, v, last, strict=True)), v_min


def bound(steps, lr, params, dtype, extra=0.0):
    update = adam_update_bound(steps, BETAS[1])
    return drift_bound(steps, lr, update, max_abs(params) + 1.0, dtype, ROUNDINGS + extra)


def ours(params, grads, gamma=GAMMA, **hp):
    return run(lambda ps: MARS(ps, betas=BETAS, gamma=gamma, **hp), params, grads)


@pytest.mark.parametrize("scale", [0.1, 3.0])  # corrected gradients below and above norm 1
@pytest.mark.parametrize("weight_decay", [0.0, 0.125])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_the_papers_algorithm_in_float64(scale, weight_decay, maximize):
    params, grads = problem(scale=scale)
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    got, _ = ours(params, grads, **hp)
    ref, _, _ = reference_mars(params, grads, **hp)
    assert_close_by(got, ref, bound(len(grads), 1e-2, params, torch.float64))


def test_matches_the_papers_algorithm_in_float32():
    params, grads = problem(dtype=torch.float32, scale=0.5)
    hp = dict(lr=1e-2, weight_decay=0.125)
    got, _ = ours(params, grads, **hp)
    ref, _, _ = reference_mars(params, grads, **hp)
    assert_close_by(got, ref, bound(len(grads), 1e-2, params, torch.float32))


def test_bfloat16_parameters_keep_float32_state_and_round_once_per_step():
    params, grads = problem(steps=4, dtype=torch.bfloat16, scale=0.5)
    got, opt = ours(params, grads, lr=1e-2)
    ref, ref_state, _ = reference_mars(params, grads, lr=1e-2, round_to=torch.bfloat16)
    # The moments and the kept gradient never see the parameter. The kept gradient is the last
    # bfloat16 gradient, exactly; the moments are EMAs of the clipped
    # corrected gradient c (|c| <= 1 + 2·gamma·beta1/(1 − beta1) times max|g|) and of c²: each
    # step rounds ~3 times by u times a term at most that bound, plus c's own error (N/2 + 6)u.
    u, T = torch.finfo(torch.float32).eps / 2, len(grads)
    c_max = (1 + 2 * GAMMA * BETAS[0] / (1 - BETAS[0])) * max_abs([g for s in grads for g in s])
    atol = {"exp_avg": (N + 12) * T * u * c_max, "exp_avg_sq": (N + 12) * T * u * c_max**2}
    for p, (m, v, last) in zip(opt.param_groups[0]["params"], ref_state, strict=True):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert state["last_grad"].dtype == torch.bfloat16  # the gradient's own, exactly
        assert torch.equal(state["last_grad"].double(), last)
        for key, want in (("exp_avg", m), ("exp_avg_sq", v)):
            torch.testing.assert_close(state[key].double(), want, rtol=0.0, atol=atol[key])
    # One rounding to bfloat16 per step, from a float32 value: one ulp per step at most (see
    # test_ademamix).
    for p, r in zip(got, ref, strict=True):
        assert p.dtype == torch.bfloat16
        assert ((p.double() - r).abs() <= len(grads) * bf16_ulp(r)).all()


def test_gamma_zero_below_norm_one_is_torch_adamw():
    # Without the correction and with every gradient's norm below 1 (no clipping), MARS-AdamW
    # is AdamW.
    params, grads = problem(dtype=torch.float32, scale=0.05)
    assert max(float(g.norm()) for step in grads for g in step) < 1
    hp = dict(lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.125)
    got, _ = run(lambda ps: MARS(ps, gamma=0.0, **hp), params, grads)
    want, _ = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **hp), params, grads)
    assert_close_by(got, want, bound(len(grads), 1e-2, params, torch.float32))


def test_clipping_makes_the_step_independent_of_the_gradient_scale():
    # Every corrected gradient above norm 1 is divided by its norm: multiplying all gradients by
    # 10 leaves the corrected gradients, hence the whole trajectory, unchanged (to rounding).
    params, grads = problem(scale=100.0)
    big = [[10.0 * g for g in step] for step in grads]
    a, _ = ours(params, grads, lr=1e-2)
    b, _ = ours(params, big, lr=1e-2)
    assert_close_by(a, b, bound(len(grads), 1e-2, params, torch.float64))


def test_the_first_step_has_no_correction():
    # The paper starts from x_0 = x_1, so c_1 = g_1: the first step is AdamW's on g_1 (clipped).
    params, grads = problem(steps=1, scale=0.1)
    got, _ = ours(params, grads, lr=1e-2, gamma=0.5)
    want, _ = run(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=BETAS, weight_decay=0.0), params, grads
    )
    assert_close_by(got, want, bound(1, 1e-2, params, torch.float64))


def test_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    params, grads = problem(steps=8, scale=0.5)
    hp = dict(lr=1e-2, betas=BETAS, gamma=GAMMA, weight_decay=0.125)

    def peer(prime_last_grad: bool, eps: float):
        def make(ps):
            # optimize_1d=True: MARS on every parameter (its default sends vectors to AdamW);
            # weight_decouple=True (its default) is AdamW's decay.
            opt = po.MARS(ps, eps=eps, optimize_1d=True, foreach=False, **hp)
            if prime_last_grad:  # start from x_0 = x_1 as the paper does: no first correction
                for p, g in zip(ps, grads[0], strict=True):
                    state = opt.state[p]
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["last_grad"] = g.clone()
            return opt

        return run(make, params, grads)[0]

    # Fed the same gradients from the same start, and with eps = 0 (pytorch_optimizer places eps
    # inside the bias correction: see below), it takes our steps, up to rounding and its 1e-15
    # added to v under the square root: relative 1e-15 / (2 v) on the denominator.
    got, _ = ours(params, grads, eps=0.0, lr=1e-2, weight_decay=0.125)
    _, _, v_min = reference_mars(params, grads, **hp, eps=0.0)
    u = torch.finfo(torch.float64).eps / 2
    atol = bound(len(grads), 1e-2, params, torch.float64, extra=1e-15 / (2 * v_min) / u)
    assert_close_by(peer(True, 0.0), got, atol)
    # What differs, pinned: its first correction uses a zero previous gradient, and its eps is
    # divided by sqrt(1 − beta2^t). The paper's algorithm with those two changes is its result.
    theirs = peer(False, 1e-8)
    ref, _, _ = reference_mars(
        params, grads, **hp, eps=1e-8, first_previous="zero", peer_denominator=True
    )
    assert_close_by(theirs, ref, bound(len(grads), 1e-2, params, torch.float64))
    ours_default, _ = ours(params, grads, eps=1e-8, lr=1e-2, weight_decay=0.125)
    assert max_abs([a - b for a, b in zip(ours_default, theirs, strict=True)]) > 1e3 * atol


def test_registry_entry_and_defaults():
    spec = gd.optimizers()["mars"]
    assert spec.state_buffers == 3.0 and "2411.10438" in spec.reference
    opt = gd.create("mars", [torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert isinstance(opt, MARS)
    assert (group["lr"], group["betas"], group["gamma"], group["eps"]) == (
        3e-3, (0.95, 0.99), 0.025, 1e-8
    )


@pytest.mark.parametrize("hp, match", [(dict(gamma=-0.1), "gamma"), (dict(eps=-1.0), "eps")])
def test_constructor_validates(hp, match):
    with pytest.raises(ValueError, match=match):
        MARS([torch.nn.Parameter(torch.zeros(2))], **hp)
    with pytest.raises(ValueError, match=match):
        gd.create("mars", [torch.nn.Parameter(torch.zeros(2))], **hp)
