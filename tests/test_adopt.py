"""ADOPT against the algorithm of the paper and the official code written out in float64, and
pytorch_optimizer's ``ADOPT`` (arXiv 2411.02853)."""

from __future__ import annotations

import pytest
import torch
from elementwise_problem import (
    assert_close_by,
    bf16_ulp,
    drift_bound,
    max_abs,
    problem,
    run,
)

import guided_descent as gd
from guided_descent.optimizers.adopt import ADOPT

BETAS = (0.9, 0.9999)
# Roundings of one update in one computation: sqrt, floor, division, clamp, the momentum's lerp,
# decay and step; v's update comes after use.
ROUNDINGS = 16


def paper_clip(t: int) -> float:
    """The clipping bound at the t-th momentum update (t from 1): t^(1/4)."""
    return t**0.25


def reference_adopt(
    params,
    grads_per_step,
    *,
    lr,
    betas=BETAS,
    eps=1e-6,
    clip=paper_clip,
    weight_decay=0.0,
    maximize=False,
    decay_on_measuring_step=False,
    round_to=None,
):
    """ADOPT with clipping (paper v3; official code, iShohei220/adopt) in float64: the first
    gradient only sets v; then normalise by the previous v, clip, momentum, step, and only then
    update v. ``clip=None``: the original ADOPT. ``decay_on_measuring_step``: decay p on the
    first step too (pytorch_optimizer). Returns the parameters and (m, v) per parameter."""
    beta1, beta2 = betas
    theta = [p.double().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for t, grads in enumerate(grads_per_step):  # t = 0: the measuring step
        for i, g in enumerate(grads):
            g = -g.double() if maximize else g.double()
            if t == 0:
                v[i] = g * g
                if decay_on_measuring_step:
                    theta[i] = theta[i] * (1 - lr * weight_decay)
                continue
            n = g / torch.clamp(v[i].sqrt(), min=eps)
            if clip is not None:
                n = n.clamp(-clip(t), clip(t))
            m[i] = beta1 * m[i] + (1 - beta1) * n
            theta[i] = theta[i] - lr * (m[i] + weight_decay * theta[i])
            if round_to is not None:
                theta[i] = theta[i].to(round_to).double()
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
    return theta, list(zip(m, v, strict=True))


def update_bound(grads, clip=paper_clip) -> float:
    # |m| <= the largest |n| seen: the clip bound, or (unclipped) max|g| / eps.
    steps = len(grads)
    if clip is not None:
        return max(clip(t) for t in range(1, steps))
    return max_abs([g for s in grads for g in s]) / 1e-6


def bound(grads, lr, params, dtype, clip=paper_clip):
    steps = len(grads)
    return drift_bound(steps, lr, update_bound(grads, clip), max_abs(params) + 1, dtype, ROUNDINGS)


def ours(params, grads, **hp):
    return run(lambda ps: ADOPT(ps, betas=BETAS, **hp), params, grads)


@pytest.mark.parametrize("clip_exponent", [0.25, None])
@pytest.mark.parametrize("weight_decay", [0.0, 0.125])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_the_papers_algorithm_in_float64(clip_exponent, weight_decay, maximize):
    # scale 1e-3: early normalised gradients |g_t| / |g_0| exceed the t^(1/4) bound often
    # enough that clipping is exercised (and eps = 1e-6 floors some of sqrt(v)).
    params, grads = problem(steps=8, scale=1e-3)
    hp = dict(lr=1e-2, eps=1e-6, weight_decay=weight_decay, maximize=maximize)
    got, _ = ours(params, grads, clip_exponent=clip_exponent, **hp)
    clip = paper_clip if clip_exponent is not None else None
    ref, _ = reference_adopt(params, grads, clip=clip, **hp)
    assert_close_by(got, ref, bound(grads, 1e-2, params, torch.float64, clip))


def test_matches_the_papers_algorithm_in_float32():
    params, grads = problem(steps=8, dtype=torch.float32)
    hp = dict(lr=1e-2, weight_decay=0.125)
    got, _ = ours(params, grads, **hp)
    ref, _ = reference_adopt(params, grads, **hp)
    assert_close_by(got, ref, bound(grads, 1e-2, params, torch.float32))


def test_bfloat16_parameters_keep_float32_state_and_round_once_per_step():
    params, grads = problem(steps=5, dtype=torch.bfloat16)
    got, opt = ours(params, grads, lr=1e-2)
    ref, ref_state = reference_adopt(params, grads, lr=1e-2, round_to=torch.bfloat16)
    # m and v never see the parameter: |n| <= the clip bound c, so m errs by at most
    # ~(5 + ROUNDINGS)·u·c per step; v's EMA of g² by ~3u·max g² per step.
    u, T = torch.finfo(torch.float32).eps / 2, len(grads)
    g_max = max_abs([g for s in grads for g in s])
    atol = {"exp_avg": T * ROUNDINGS * u * update_bound(grads), "exp_avg_sq": 4 * T * u * g_max**2}
    for p, (m, v) in zip(opt.param_groups[0]["params"], ref_state, strict=True):
        for key, want in (("exp_avg", m), ("exp_avg_sq", v)):
            assert opt.state[p][key].dtype == torch.float32
            torch.testing.assert_close(opt.state[p][key].double(), want, rtol=0.0, atol=atol[key])
    # One rounding to bfloat16 per step from a float32 value: one ulp per step at most.
    for p, r in zip(got, ref, strict=True):
        assert p.dtype == torch.bfloat16
        assert ((p.double() - r).abs() <= len(grads) * bf16_ulp(r)).all()


def test_the_first_step_only_measures():
    params, grads = problem(steps=1)
    got, opt = ours(params, grads, lr=1e-2, weight_decay=0.5)
    for p0, p, g, q in zip(params, got, grads[0], opt.param_groups[0]["params"], strict=True):
        assert torch.equal(p, p0)  # no move, no decay
        assert torch.equal(opt.state[q]["exp_avg_sq"], g * g)
        assert not opt.state[q]["exp_avg"].any()
        assert float(opt.state[q]["step"]) == 1.0


def test_clipping_bounds_the_first_update():
    # A near-zero first gradient makes the next normalised gradient huge (1 / 1e-5). Clipped at
    # 1 ** (1/4) = 1, the momentum is (1 − beta1)·1 and p moves by exactly lr·(1 − beta1); the
    # original, unclipped ADOPT moves it by lr·(1 − beta1)·1e5. (Numbers exact in binary.)
    p0 = torch.tensor([0.5])
    grads = [[torch.tensor([1e-5])], [torch.tensor([1.0])]]
    clipped, _ = run(lambda ps: ADOPT(ps, lr=0.5, betas=(0.75, 0.9)), [p0], grads)
    assert clipped[0].item() == 0.5 - 0.5 * 0.25
    raw, _ = run(lambda ps: ADOPT(ps, lr=0.5, betas=(0.75, 0.9), clip_exponent=None), [p0], grads)
    assert raw[0].item() == pytest.approx(0.5 - 0.5 * 0.25 / 1e-5, rel=1e-6)


def test_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    params, grads = problem(steps=8, scale=1e-3)

    def peer(clip_lambda, weight_decay=0.0):
        make = lambda ps: po.ADOPT(  # noqa: E731
            ps, lr=1e-2, betas=BETAS, eps=1e-6, clip_lambda=clip_lambda,
            weight_decay=weight_decay, weight_decouple=True, foreach=False,
        )
        return run(make, params, grads)[0]

    # pytorch_optimizer counts the measuring step in the clipping bound's step: its bound at the
    # t-th momentum update is (t + 1)^(1/4). Given the official count, it takes our steps.
    atol = bound(grads, 1e-2, params, torch.float64)
    got, _ = ours(params, grads, lr=1e-2)
    assert_close_by(peer(lambda step: (step - 1) ** 0.25), got, atol)
    # Its own count, pinned: the paper's algorithm with the shifted bound, not ours.
    theirs = peer(lambda step: step**0.25)
    shifted, _ = reference_adopt(params, grads, lr=1e-2, clip=lambda t: (t + 1) ** 0.25)
    assert_close_by(theirs, shifted, bound(grads, 1e-2, params, torch.float64))
    assert max_abs([a - b for a, b in zip(theirs, got, strict=True)]) > 1e3 * atol
    # It also decays p on the measuring step: with the same bound, its parameters differ from
    # ours by exactly that one extra factor on p_0, -lr·wd·(1 − lr·wd)^(T−1)·p_0 (the updates
    # do not depend on p), up to rounding.
    wd, T = 0.125, len(grads)
    theirs = peer(lambda step: (step - 1) ** 0.25, weight_decay=wd)
    got, _ = ours(params, grads, lr=1e-2, weight_decay=wd)
    extra = [-1e-2 * wd * (1 - 1e-2 * wd) ** (T - 1) * p0 for p0 in params]
    assert_close_by([a - b for a, b in zip(theirs, got, strict=True)], extra, 2 * atol)


def test_registry_entry_and_defaults():
    spec = gd.optimizers()["adopt"]
    assert spec.state_buffers == 2.0 and "2411.02853" in spec.reference
    opt = gd.create("adopt", [torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert isinstance(opt, ADOPT)
    assert (group["lr"], group["betas"], group["eps"], group["clip_exponent"]) == (
        1e-3, (0.9, 0.9999), 1e-6, 0.25
    )


@pytest.mark.parametrize(
    "hp, match", [(dict(eps=0.0), "eps"), (dict(clip_exponent=-0.25), "clip_exponent")]
)
def test_constructor_validates(hp, match):
    with pytest.raises(ValueError, match=match):
        ADOPT([torch.nn.Parameter(torch.zeros(2))], **hp)
    with pytest.raises(ValueError, match=match):
        gd.create("adopt", [torch.nn.Parameter(torch.zeros(2))], **hp)
