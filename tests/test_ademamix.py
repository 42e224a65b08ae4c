"""AdEMAMix against the paper's Algorithm 1 written out in float64, torch's AdamW (alpha = 0),
pytorch_optimizer's ``AdEMAMix`` and heavyball's ``AdEMAMix`` (arXiv 2409.03137)."""

from __future__ import annotations

import math

import pytest
import torch
from elementwise_problem import (
    adam_update_bound,
    assert_close_by,
    bf16_ulp,
    drift_bound,
    heavyball_eager,
    max_abs,
    problem,
    run,
)

import guided_descent as gd
from guided_descent.optimizers.ademamix import AdEMAMix, ademamix_alpha, ademamix_beta3

BETAS, BETA3, ALPHA = (0.9, 0.999), 0.9999, 5.0
# Roundings of one update in one computation (promotion, three EMAs, sqrt, two bias
# corrections, the mix, the division, decay and step): fewer than 24.
ROUNDINGS = 24
# With a warm-up, beta3(t) is computed two ways (the paper's formula, our half-life form): each
# within a few ulps (|exp argument| <= |ln beta1| < 1), so the weight 1 - beta3(t) >= 1 - beta3
# carries a relative error of at most 8u / (1 - beta3), and so does the slow EMA built from it.
SCHEDULE_ROUNDINGS = 8 / (1 - BETA3)


def paper_alpha(t: int, alpha: float, T: int | None) -> float:
    """f_alpha of the paper: min(t·alpha / T, alpha)."""
    return alpha if T is None else min(t * alpha / T, alpha)


def paper_beta3(t: int, beta1: float, beta3: float, T: int | None) -> float:
    """f_beta3 of the paper: min(exp(ln b1 ln b3 / ((1 − t/T) ln b3 + (t/T) ln b1)), b3)."""
    if T is None:
        return beta3
    lb1, lb3 = math.log(beta1), math.log(beta3)
    return min(math.exp(lb1 * lb3 / ((1 - t / T) * lb3 + (t / T) * lb1)), beta3)


def official_beta3(t: int, beta1: float, beta3: float, T: int | None) -> float:
    """apple/ml-ademamix's ``linear_hl_warmup_scheduler``: ln(beta + 1e-8) where the paper has
    ln(beta) (heavyball copies it)."""
    if T is None or t >= T:
        return beta3

    def f(beta: float) -> float:
        return math.log(0.5) / math.log(beta + 1e-8) - 1

    a = t / T
    return math.pow(0.5, 1 / ((1 - a) * f(beta1) + a * f(beta3) + 1))


def reference_ademamix(
    params,
    grads_per_step,
    *,
    lr,
    betas=BETAS,
    beta3=BETA3,
    alpha=ALPHA,
    alpha_warmup=None,
    beta3_warmup=None,
    eps=1e-8,
    weight_decay=0.0,
    maximize=False,
    beta3_schedule=paper_beta3,
    round_to=None,
):
    """Algorithm 1 of the paper in float64, one line per line. ``round_to``: round the
    parameters to this dtype after every step (what a low-precision parameter stores).
    Returns the parameters and the state (m1, m2, nu) per parameter."""
    beta1, beta2 = betas
    theta = [p.double().clone() for p in params]
    m1 = [torch.zeros_like(t) for t in theta]
    m2 = [torch.zeros_like(t) for t in theta]
    nu = [torch.zeros_like(t) for t in theta]
    for t, grads in enumerate(grads_per_step, start=1):
        b3 = beta3_schedule(t, beta1, beta3, beta3_warmup)
        a = paper_alpha(t, alpha, alpha_warmup)
        for i, g in enumerate(grads):
            g = -g.double() if maximize else g.double()
            m1[i] = beta1 * m1[i] + (1 - beta1) * g
            m2[i] = b3 * m2[i] + (1 - b3) * g
            nu[i] = beta2 * nu[i] + (1 - beta2) * g * g
            m1_hat = m1[i] / (1 - beta1**t)
            nu_hat = nu[i] / (1 - beta2**t)
            theta[i] = theta[i] - lr * (
                (m1_hat + a * m2[i]) / (nu_hat.sqrt() + eps) + weight_decay * theta[i]
            )
            if round_to is not None:
                theta[i] = theta[i].to(round_to).double()
    return theta, list(zip(m1, m2, nu, strict=True))


def bound(steps, lr, params, dtype, warmup, alpha=ALPHA):
    # |m̂1 / d| and |m2 / d| are at most the Adam bound (m2 is a sub-convex combination of the
    # gradients): the update is at most (1 + alpha) times it.
    roundings = ROUNDINGS + (SCHEDULE_ROUNDINGS if warmup and dtype == torch.float64 else 0)
    update = (1 + alpha) * adam_update_bound(steps, BETAS[1])
    return drift_bound(steps, lr, update, max_abs(params) + 1.0, dtype, roundings)


def ours(params, grads, **hp):
    return run(lambda ps: AdEMAMix(ps, betas=BETAS, beta3=BETA3, **hp), params, grads)


@pytest.mark.parametrize("warmup", [None, (4, 3)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.125])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_the_papers_algorithm_in_float64(warmup, weight_decay, maximize):
    params, grads = problem()
    T_alpha, T_beta3 = warmup or (None, None)
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
    got, _ = ours(params, grads, alpha_slow=ALPHA, alpha_warmup=T_alpha, beta3_warmup=T_beta3, **hp)
    ref, _ = reference_ademamix(
        params, grads, alpha=ALPHA, alpha_warmup=T_alpha, beta3_warmup=T_beta3, **hp
    )
    assert_close_by(got, ref, bound(len(grads), 1e-2, params, torch.float64, warmup))


def test_matches_the_papers_algorithm_in_float32():
    params, grads = problem(dtype=torch.float32)
    hp = dict(lr=1e-2, weight_decay=0.125, alpha_warmup=4, beta3_warmup=3)
    got, opt = ours(params, grads, alpha_slow=ALPHA, **hp)
    ref, _ = reference_ademamix(params, grads, alpha=ALPHA, **hp)
    assert all(p.dtype == torch.float32 for p in got)
    assert_close_by(got, ref, bound(len(grads), 1e-2, params, torch.float32, True))


def test_bfloat16_parameters_keep_float32_state_and_round_once_per_step():
    params, grads = problem(steps=4, dtype=torch.bfloat16)
    hp = dict(lr=1e-2, alpha_warmup=4, beta3_warmup=3)
    got, opt = ours(params, grads, alpha_slow=ALPHA, **hp)
    ref, ref_state = reference_ademamix(params, grads, alpha=ALPHA, round_to=torch.bfloat16, **hp)
    # The moments never see the parameter: float32 moments match the float64 ones to float32
    # rounding. An EMA step rounds ~3 times, each by u times its larger term, and the terms are
    # at most (1 − beta^T) max|x| (x = g, or g² for nu; 1 for the warming-up slow EMA).
    u, T = torch.finfo(torch.float32).eps / 2, len(grads)
    g_max = max_abs([g for step in grads for g in step])
    scale = {
        "exp_avg": (1 - BETAS[0] ** T) * g_max,
        "exp_avg_slow": g_max,
        "exp_avg_sq": (1 - BETAS[1] ** T) * g_max**2,
    }
    for p, (m1, m2, nu) in zip(opt.param_groups[0]["params"], ref_state, strict=True):
        state = opt.state[p]
        for key, want in (("exp_avg", m1), ("exp_avg_slow", m2), ("exp_avg_sq", nu)):
            assert state[key].dtype == torch.float32
            torch.testing.assert_close(
                state[key].double(), want, rtol=0.0, atol=4 * T * u * scale[key]
            )
    # Each step computes the new value in float32 and rounds it to bfloat16 once, as the
    # reference rounds its float64 value: the two round values at most float32 rounding apart,
    # so they land on the same bfloat16 number or on neighbours: one ulp per step at most.
    for p, r in zip(got, ref, strict=True):
        assert p.dtype == torch.bfloat16
        assert ((p.double() - r).abs() <= len(grads) * bf16_ulp(r)).all()


def test_alpha_zero_is_torch_adamw():
    # With alpha = 0 the slow EMA is kept but unused: the update is AdamW's, formula for formula.
    params, grads = problem(dtype=torch.float32)
    hp = dict(lr=1e-2, betas=BETAS, eps=1e-8, weight_decay=0.125)
    got, _ = run(lambda ps: AdEMAMix(ps, alpha_slow=0.0, **hp), params, grads)
    want, _ = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **hp), params, grads)
    update = adam_update_bound(len(grads), BETAS[1])
    atol = drift_bound(len(grads), 1e-2, update, max_abs(params) + 1, torch.float32, ROUNDINGS)
    assert_close_by(got, want, atol)


def test_schedules_are_the_papers():
    for t in range(1, 25):
        t_ = torch.tensor(float(t))
        assert float(ademamix_alpha(t_, 8.0, 10)) == pytest.approx(paper_alpha(t, 8.0, 10))
        ours_b3 = float(ademamix_beta3(t_, 0.9, 0.9999, 10))
        # float64 both ways, a few ulps apart (see SCHEDULE_ROUNDINGS).
        assert ours_b3 == pytest.approx(paper_beta3(t, 0.9, 0.9999, 10), abs=1e-15)
        if t >= 10:  # warmed up: exactly the final values
            assert ours_b3 == 0.9999 and float(ademamix_alpha(t_, 8.0, 10)) == 8.0
    # The warm-up starts from beta1 (t = 0) and rises with t.
    rising = [float(ademamix_beta3(torch.tensor(t), 0.9, 0.9999, 50)) for t in range(51)]
    assert rising[0] == pytest.approx(0.9, rel=1e-15)
    assert all(a < b for a, b in zip(rising, rising[1:], strict=False))
    # beta1 = 0 (half-life 0, where the paper's formula takes ln 0) has the formula's limit
    # beta3^(T/t).
    b3 = float(ademamix_beta3(torch.tensor(2.0), 0.0, 0.9999, 8))
    assert b3 == pytest.approx(0.9999**4, rel=1e-14)
    # No warm-up: constants, untouched.
    assert ademamix_beta3(torch.tensor(1.0), 0.9, 0.9999, None) == 0.9999
    assert ademamix_alpha(torch.tensor(1.0), 8.0, None) == 8.0


def test_the_official_scheduler_differs_from_the_papers_by_its_log_epsilon():
    # apple/ml-ademamix (and heavyball) take ln(beta + 1e-8): |ln(0.9999)| shrinks by 1e-4
    # relative, so during the warm-up 1 − beta3(t) is up to ~1e-4 (relative) smaller than the
    # paper's, which we follow; once warmed up both are beta3.
    rel = [
        abs((1 - official_beta3(t, 0.9, 0.9999, 100)) / (1 - paper_beta3(t, 0.9, 0.9999, 100)) - 1)
        for t in range(1, 100)
    ]
    assert 1e-6 < max(rel) < 2e-4
    assert official_beta3(100, 0.9, 0.9999, 100) == paper_beta3(100, 0.9, 0.9999, 100)


def test_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    params, grads = problem(steps=8)
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.125)
    got, _ = ours(params, grads, alpha_slow=ALPHA, alpha_warmup=5, beta3_warmup=5, **hp)
    # pytorch_optimizer: one warm-up for both; weight_decouple=True is AdamW's decay (its
    # default adds weight_decay * p to the gradient instead); the paper's beta3 formula.
    want, _ = run(
        lambda ps: po.AdEMAMix(
            ps, betas=(*BETAS, BETA3), alpha=ALPHA, t_alpha_beta3=5, weight_decouple=True, **hp
        ),
        params,
        grads,
    )
    assert_close_by(got, want, bound(len(grads), 1e-2, params, torch.float64, True))


def test_matches_heavyball():
    heavyball = pytest.importorskip("heavyball")
    params, grads = problem(steps=8)
    # heavyball floors sqrt(v̂) at eps (max(sqrt(v̂), eps)) where the paper adds eps: eps = 0
    # makes the two one expression. It keeps lr as a float32 tensor: 2^-7 is exact there.
    # Its beta3 warm-up is the official one (see the test above): beta3_warmup is left off here
    # and compared on its own below.
    lr = 2.0**-7
    hp = dict(lr=lr, eps=0.0, weight_decay=0.125, alpha_warmup=4)
    got, _ = ours(params, grads, alpha_slow=ALPHA, **hp)
    with heavyball_eager():
        want, _ = run(
            lambda ps: heavyball.AdEMAMix(
                ps, betas=(*BETAS, BETA3), alpha=ALPHA, storage_dtype="float64", **hp
            ),
            params,
            grads,
        )
        warm, _ = run(
            lambda ps: heavyball.AdEMAMix(
                ps, betas=(*BETAS, BETA3), alpha=ALPHA, storage_dtype="float64", beta3_warmup=4,
                **hp,
            ),
            params,
            grads,
        )
    atol = bound(len(grads), lr, params, torch.float64, False)
    assert_close_by(got, want, atol)
    # With the beta3 warm-up heavyball follows the official scheduler: it matches the paper's
    # algorithm run with that scheduler, and not ours beyond rounding.
    official, _ = reference_ademamix(
        params, grads, alpha=ALPHA, beta3_warmup=4, beta3_schedule=official_beta3, **hp
    )
    assert_close_by(warm, official, bound(len(grads), lr, params, torch.float64, True))
    ours_warm, _ = ours(params, grads, alpha_slow=ALPHA, beta3_warmup=4, **hp)
    assert max_abs([a - b for a, b in zip(ours_warm, warm, strict=True)]) > 1e3 * atol


def test_registry_entry_and_defaults():
    spec = gd.optimizers()["ademamix"]
    assert spec.state_buffers == 3.0 and "2409.03137" in spec.reference
    opt = gd.create("ademamix", [torch.nn.Parameter(torch.zeros(2))])
    group = opt.param_groups[0]
    assert isinstance(opt, AdEMAMix)
    assert (group["lr"], group["betas"], group["beta3"], group["alpha_slow"]) == (
        1e-3, (0.9, 0.999), 0.9999, 8.0
    )
    assert group["alpha_warmup"] is None and group["beta3_warmup"] is None


@pytest.mark.parametrize(
    "hp, match",
    [
        (dict(beta3=1.0), "beta3"),
        (dict(beta3=None), "beta3"),  # Prodigy shares the check and accepts None; AdEMAMix not
        (dict(alpha_slow=-1.0), "alpha_slow"),
        (dict(alpha_warmup=0), "alpha_warmup"),
        (dict(beta3_warmup=2.5), "beta3_warmup"),
        (dict(betas=(0.9, 0.999, 0.9999)), "betas"),
    ],
)
def test_constructor_validates(hp, match):
    with pytest.raises(ValueError, match=match):
        AdEMAMix([torch.nn.Parameter(torch.zeros(2))], **hp)
    with pytest.raises(ValueError, match=match):
        gd.create("ademamix", [torch.nn.Parameter(torch.zeros(2))], **hp)
