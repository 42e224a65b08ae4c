"""PSGD Kron: against pytorch_optimizer's ``Kron`` step by step, and against the math.

pytorch_optimizer's ``Kron`` is Walters' ``kron-torch`` (the form heavyball's ``PSGDKron`` grew
from). It draws its probes with ``torch.randn_like``; the parity tests hand it ours, turn its
random balancing off (ours rescales by powers of two, which changes no bit of the result) and
fit at every step on both sides, so that the two compute the same numbers up to rounding.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.optimizers.psgd import PSGDKron
from guided_descent.preconditioners import psgd as P

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
kron_module = pytest.importorskip("pytorch_optimizer.optimizer.psgd")

# A matrix, a 3-D kernel, a vector and a scalar: dense and diagonal factors, and the scalar path.
SHAPES = [(6, 5), (3, 4, 2), (4,), ()]
STEPS = 6
PSGD_SEED = 1234
# (group, position) of each parameter in run_ours's groups: what names its probe stream.
STREAMS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def parameters(dtype: torch.dtype) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES
    ]


def gradients(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # Anisotropic, so that the fitted preconditioner is far from a multiple of the identity.
    out = []
    for s in SHAPES:
        x = torch.randn(s, generator=g, dtype=torch.float64)
        if x.dim() >= 1:
            x = x * torch.linspace(0.2, 3.0, x.shape[-1], dtype=torch.float64)
        out.append(x.to(dtype))
    return out


def solve_triangular_right_keeping_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # pytorch_optimizer solves in float32 whatever the dtype; for the float64 comparison the same
    # solve, X A⁻¹, in the inputs' dtype.
    flat = x.reshape(-1, x.size(-1))
    return torch.linalg.solve_triangular(a, flat, upper=True, left=False).reshape_as(x)


def run_reference(dtype: torch.dtype, weight_decay: float, monkeypatch) -> list[torch.Tensor]:
    params = parameters(dtype)
    probes: list[torch.Tensor] = []

    def fake_randn_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        v = probes.pop(0)
        assert v.shape == t.shape
        return v.to(dtype or t.dtype)

    monkeypatch.setattr(torch, "randn_like", fake_randn_like)
    if dtype == torch.float64:
        monkeypatch.setattr(
            kron_module, "solve_triangular_right", solve_triangular_right_keeping_dtype
        )
    opt = kron_module.Kron(
        params,
        lr=0.05,
        momentum=0.9,
        weight_decay=weight_decay,
        pre_conditioner_update_probability=1.0,
        balance_prob=0.0,
        precondition_dtype=dtype,
    )
    for step in range(1, STEPS + 1):
        for j, (p, g) in enumerate(zip(params, gradients(step, dtype), strict=True)):
            p.grad = g
            key = P.probe_key(PSGD_SEED, *STREAMS[j])
            probes.append(P.probe(tuple(p.shape), key, step, dtype, p.device))
        opt.step()
        assert not probes
    monkeypatch.undo()
    return [p.detach().clone() for p in params]


def run_ours(dtype: torch.dtype, weight_decay: float) -> list[torch.Tensor]:
    params = parameters(dtype)
    # Every parameter in the PSGD group (vectors and the scalar take its diagonal path); the
    # references decay only >= 2-D parameters, so the vector and scalar get no weight decay.
    groups = [
        {"params": params[:2], "algorithm": "psgd_kron", "weight_decay": weight_decay},
        {"params": params[2:], "algorithm": "psgd_kron", "weight_decay": 0.0},
    ]
    opt = PSGDKron(
        groups,
        lr=0.05,
        momentum=0.9,
        preconditioner_update_probability=1.0,
        precondition_init_scale=1.0,  # pytorch_optimizer's (ours defaults to Li's heuristic)
        seed=PSGD_SEED,
    )
    for step in range(1, STEPS + 1):
        for p, g in zip(params, gradients(step, dtype), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


# --- parity with pytorch_optimizer's Kron ------------------------------------------------------


def displacement_errors(ours, reference, dtype) -> list[float]:
    """Per parameter: ‖ours - reference‖ / ‖reference - start‖ (both in float64)."""
    start = parameters(torch.float64)
    return [
        ((a.double() - b.double()).norm() / (b.double() - s).norm()).item()
        for a, b, s in zip(ours, reference, start, strict=True)
    ]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_pytorch_optimizer_kron_in_float64(weight_decay, monkeypatch):
    # Same probes, same schedule (a fit every step), no random balancing: the same arithmetic up
    # to the order of operations. Six steps of at most ~30-term sums, one triangular solve of
    # order <= 6 (κ(Q) stays below ~3) and a multiplicative fit (|lr·E| <= 0.1, so an error grows
    # by at most 1.1 per step): |ours - reference| <~ 6 · 30 · 3 · 2 u ≈ 1e3 u relative to the
    # displacement, u = 1.1e-16. 1e-12 is 1e4 u. Measured: <= 2e-15.
    reference = run_reference(torch.float64, weight_decay, monkeypatch)
    ours = run_ours(torch.float64, weight_decay)
    errors = displacement_errors(ours, reference, torch.float64)
    assert max(errors) <= 1e-12, errors


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_float32_stays_within_rounding_of_the_float64_reference(weight_decay, monkeypatch):
    # The same 1e3 u bound as above with u = 6e-8 (float32): 6e-5 relative to the displacement.
    # Measured: <= 3.1e-6 (the scalar, whose displacement is smallest), the reference's own
    # float32 run as far.
    truth = run_reference(torch.float64, weight_decay, monkeypatch)
    ours = run_ours(torch.float32, weight_decay)
    errors = displacement_errors(ours, truth, torch.float32)
    assert max(errors) <= 1e3 * torch.finfo(torch.float32).eps / 2, errors


@pytest.mark.parametrize("mode", [None, "one_diag", "smart_one_diag", "all_diag"])
@pytest.mark.parametrize("shape", [(6, 5), (5, 5), (3, 40, 2), (7,), (1, 9), (20, 3)])
def test_dense_or_diagonal_factors_as_the_reference_chooses(shape, mode):
    qs, _ = kron_module.initialize_q_expressions(torch.zeros(shape), 1.0, 16, 2, mode)
    expected = tuple(q.dim() == 2 for q in qs)
    assert P.dense_dims(shape, 16, 2, mode) == expected


def test_the_schedule_is_the_references_probability():
    ref = kron_module.precondition_update_prob_schedule()
    schedule = P.UpdateSchedule()
    for n in range(0, 6000, 37):
        # The reference evaluates exp in float32: within a few float32 roundings.
        assert schedule.probability(n) == pytest.approx(float(ref(n)), rel=4e-7)


def test_the_schedule_spends_its_probability_deterministically():
    heavyball_utils = pytest.importorskip("heavyball.utils")
    schedule = P.UpdateSchedule()
    group: dict = {}
    due = [schedule.due(t) for t in range(1, 6001)]
    # heavyball's rule (fit when the running sum crosses an integer), fed the same probability.
    expected = [
        heavyball_utils.psgd_should_update(group, lambda n: schedule.probability(n - 1))
        for _ in range(6000)
    ]
    assert due == expected
    assert all(due[:501])  # probability 1 for the first 501 steps (n = 0 .. 500)
    fits = [t for t, d in enumerate(due, start=1) if d]
    late = [b - a for a, b in zip(fits, fits[1:], strict=False) if a > 4500]
    assert set(late) <= {33, 34}  # probability 0.03 at the end
    assert len(fits) == math.floor(math.fsum(schedule.probability(n) for n in range(6000)))


def test_a_constant_probability_fits_every_1_over_p_steps():
    assert [P.fit_due(0.25, t) for t in range(1, 9)] == [False, False, False, True] * 2
    assert all(P.fit_due(1.0, t) for t in range(1, 50))
    assert not any(P.fit_due(0.0, t) for t in range(1, 50))


# --- the math -----------------------------------------------------------------------------------


def _spd_root(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.linalg.qr(x)[0] @ torch.diag(torch.linspace(0.3, 3.0, n, dtype=torch.float64))


def _inverse_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, u = torch.linalg.eigh(s)
    return u @ torch.diag(w**-0.5) @ u.T


def test_the_fit_converges_to_the_inverse_square_root_of_the_gradient_covariance():
    # Gradients G = A Z Bᵀ (Z standard normal) have covariance Σ = AAᵀ ⊗ BBᵀ (row-major vec);
    # the whitening fit's fixed point is QᵀQ = Σ^(-1/2) = (AAᵀ)^(-1/2) ⊗ (BBᵀ)^(-1/2). A
    # stochastic fit with a decreasing step size; from the identity (error 1.5) to within its
    # noise, ~sqrt(lr) (measured 2 % at the end; 10 % allowed).
    g = torch.Generator().manual_seed(1)
    a, b = _spd_root(4, g), _spd_root(3, g)
    target = torch.kron(_inverse_sqrt(a @ a.T), _inverse_sqrt(b @ b.T))
    qs = P.initial_factors((4, 3), (True, True), 1.0, torch.float64, torch.device("cpu"), 1)
    for t in range(1, 5001):
        z = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
        v = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
        lr = 0.1 if t <= 2000 else (0.02 if t <= 4000 else 0.005)
        P.update_factors_(qs, a @ z @ b.T, v, lr)
    fitted = torch.kron(qs[0][0].T @ qs[0][0], qs[1][0].T @ qs[1][0])
    assert (fitted - target).norm() / target.norm() < 0.1
    assert torch.equal(qs[0][0], qs[0][0].triu()) and torch.equal(qs[1][0], qs[1][0].triu())


def test_the_fit_at_the_exact_preconditioner_is_stationary_in_expectation():
    # At QᵀQ = Σ^(-1/2): E[A Aᵀ] = Q Σ Qᵀ = Q⁻ᵀ Q⁻¹ = E[B Bᵀ], the fit's two terms cancel. With
    # exact expectations (every Z and V of an orthonormal basis, summed) the step is zero up to
    # float64 rounding.
    g = torch.Generator().manual_seed(2)
    a = _spd_root(5, g)
    sigma = a @ a.T
    q = torch.linalg.cholesky(_inverse_sqrt(sigma), upper=True)  # QᵀQ = Σ^(-1/2), Q triangular
    basis = torch.eye(5, dtype=torch.float64)
    t1 = sum(torch.outer(q @ a @ e, q @ a @ e) for e in basis)
    qinv_t = torch.linalg.inv(q).T
    t2 = sum(torch.outer(qinv_t @ e, qinv_t @ e) for e in basis)
    torch.testing.assert_close(t1, t2, rtol=0, atol=1e-12)


def test_batched_factors_fit_each_matrix_alone():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    dense = (True, False)
    together = P.initial_factors((4, 5), dense, 2.0, torch.float64, torch.device("cpu"), 3)
    P.update_factors_(together, x, v, 0.3)
    P.update_factors_(together, x * 2, v, 0.3)
    for i in range(3):
        alone = P.initial_factors((4, 5), dense, 2.0, torch.float64, torch.device("cpu"), 1)
        P.update_factors_(alone, x[i : i + 1], v[i : i + 1], 0.3)
        P.update_factors_(alone, x[i : i + 1] * 2, v[i : i + 1], 0.3)
        for q, r in zip(together, alone, strict=True):
            torch.testing.assert_close(q[i], r[0], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(
            P.precondition(x, together)[i],
            P.precondition(x[i : i + 1], alone)[0],
            rtol=1e-13,
            atol=1e-14,
        )


def test_balancing_changes_no_bit_of_the_preconditioner():
    g = torch.Generator().manual_seed(4)
    q1 = torch.randn(1, 4, 4, generator=g).triu() * 2.0**20
    q2 = torch.randn(1, 3, generator=g) * 2.0**-18
    q3 = torch.randn(1, 2, 2, generator=g).triu()
    x = torch.randn(1, 4, 3, 2, generator=g)
    before = P.precondition(x, [q1, q2, q3])
    factors = [q1.clone(), q2.clone(), q3.clone()]
    P.balance_(factors)
    assert torch.equal(P.precondition(x, factors), before)
    norms = [q.abs().max().item() for q in factors]
    assert max(norms) / min(norms) < 8  # within a power of two of their geometric mean, each


def test_spectral_norm_lower_bound_is_a_lower_bound_and_close():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, 9, generator=g, dtype=torch.float64)
    s = x @ x.mT
    exact = torch.linalg.matrix_norm(s, ord=2)
    bound = P.spectral_norm_lower_bound(s)
    assert (bound <= exact * (1 + 1e-12)).all()
    assert (bound >= exact / math.sqrt(7)).all()
    reference = torch.stack(
        [pytorch_optimizer.optimizer.utils.psgd.norm_lower_bound(m.clone()) for m in s]
    )
    torch.testing.assert_close(bound, reference, rtol=1e-12, atol=0)


# --- the probes ---------------------------------------------------------------------------------


def test_probes_are_standard_normal_and_independent():
    n = 200_000
    v = P.probe((n,), P.probe_key(0, 0, 0), 1, torch.float64, torch.device("cpu"))
    w = P.probe((n,), P.probe_key(0, 0, 0), 2, torch.float64, torch.device("cpu"))
    u = P.probe((n,), P.probe_key(0, 0, 1), 1, torch.float64, torch.device("cpu"))
    # Five standard errors: a sound generator fails one of these with probability ~1e-6.
    se = 1 / math.sqrt(n)
    assert abs(v.mean().item()) < 5 * se
    assert abs(v.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((v**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis of a normal
    for other in (w, u, v.roll(1)):
        assert abs((v * other).mean().item()) < 5 * se
    # Kolmogorov-Smirnov against the normal CDF: 1.95/√n is the 0.1 % critical value.
    ordered = v.sort().values
    cdf = 0.5 * (1 + torch.erf(ordered / math.sqrt(2)))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - empirical).abs().max().item() < 1.95 * se


def test_probes_depend_on_key_and_step_only():
    a = P.probe((3, 4), 77, 5, torch.float32, torch.device("cpu"))
    b = P.probe((3, 4), 77, torch.tensor(5.0), torch.float32, torch.device("cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, P.probe((3, 4), 77, 6, torch.float32, torch.device("cpu")))
    assert not torch.equal(a, P.probe((3, 4), 78, 5, torch.float32, torch.device("cpu")))


# --- the optimizer ------------------------------------------------------------------------------


def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


# A schedule that changes within a few steps: fits at 1, 2, 3, then every other step or so.
FAST = P.UpdateSchedule(min_prob=0.3, decay=0.5, flat_start=2)


def test_state_dict_round_trip_resumes_exactly():
    model = small_model()
    opt = gd.create("psgd_kron", model, preconditioner_update_probability=FAST)
    train(model, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(5, 12))
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = small_model()
    resumed.load_state_dict(saved["model"])
    opt2 = gd.create("psgd_kron", resumed, preconditioner_update_probability=FAST)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, range(5, 12))
    for p, q in zip(resumed.parameters(), expected, strict=True):
        assert torch.equal(p, q)
    fits = [s["psgd.fits"].item() for s in opt2.state.values() if "psgd.fits" in s]
    assert fits and all(0 < f < 12 for f in fits)  # the schedule skipped some fits


def test_bfloat16_parameters_keep_float32_state_and_follow_float32():
    # The same gradients cast to each dtype (computed in float64, so that the runs differ only
    # by the parameters' rounding). A bfloat16 step rounds the parameter once (unit roundoff
    # u = 2^-8) and its gradient once; the update is a smooth function of the gradient, so the
    # runs drift apart by ~u·|p| per step: allowed 2·(steps + 1)·u·max|p|.
    steps, results = 6, []
    for dtype in (torch.float32, torch.bfloat16):
        params = [nn.Parameter(p.to(dtype)) for p in parameters(torch.float32)[:2]]
        opt = PSGDKron(params, lr=0.05)
        for step in range(1, steps + 1):
            for p, g in zip(params, gradients(step, torch.float64), strict=False):
                p.grad = g.to(dtype)
            opt.step()
        for p in params:
            state = opt.state[p]
            assert state["psgd.momentum"].dtype == torch.float32
            assert all(
                state[k].dtype == torch.float32
                for k in state
                if k.startswith("psgd.") and state[k].is_floating_point()
            )
        results.append([p.detach().float() for p in params])
    start = parameters(torch.float32)[:2]
    for a, b, s in zip(*results, start, strict=True):
        assert not torch.equal(a, s)
        bound = 2 * (steps + 1) * 2.0**-8 * a.abs().max().item()
        assert (a - b).abs().max().item() <= bound


@pytest.mark.parametrize("view", ["batch", "split:2"])
def test_views_give_each_matrix_its_own_factors(view):
    w = nn.Parameter(torch.randn(4, 3, 2))
    opt = PSGDKron([{"params": [w], "algorithm": "psgd_kron", "matrix_view": view}])
    w.grad = torch.randn(4, 3, 2)
    opt.step()
    state = opt.state[w]
    count, m, n = (4, 3, 2) if view == "batch" else (2, 2, 6)
    assert state["psgd.L"].shape == (count, m, m)
    assert state["psgd.R"].shape == (count, n, n)
    assert not torch.equal(state["psgd.L"][0], state["psgd.L"][1])


def test_large_dimensions_and_memory_save_mode_get_diagonal_factors():
    w = nn.Parameter(torch.randn(5, 40))
    opt = PSGDKron([w], max_size_triangular=30)
    w.grad = torch.randn(5, 40)
    opt.step()
    assert opt.state[w]["psgd.L"].shape == (5, 5) and opt.state[w]["psgd.R"].shape == (40,)
    opt = PSGDKron([w], memory_save_mode="all_diag")
    opt.step()
    assert opt.state[w]["psgd.L"].shape == (5,) and opt.state[w]["psgd.R"].shape == (40,)


def test_the_update_is_clipped_to_rms_1_1():
    w = nn.Parameter(torch.zeros(4, 4))
    opt = PSGDKron([w], lr=1.0, momentum=0.0, precondition_init_scale=1.0)
    w.grad = torch.full((4, 4), 1e3)
    opt.step()
    assert w.detach().square().mean().sqrt().item() == pytest.approx(1.1, rel=1e-5)


def test_the_initial_scale_follows_the_first_gradient():
    g = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    qs = P.initial_factors((4, 3), (True, False), 1.0, torch.float64, torch.device("cpu"), 1)
    P.initial_scale_(qs, g)
    product = torch.kron(qs[0][0], torch.diag(qs[1][0]))
    expected = g.pow(4).mean() ** (-1 / 8) * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(product, expected, rtol=1e-14, atol=0)
    for size in (1e-12, 1e12):  # g⁴ would underflow / overflow float32
        qs32 = P.initial_factors((4, 3), (True, False), 1.0, torch.float32, torch.device("cpu"), 1)
        P.initial_scale_(qs32, (g * size).float())
        torch.testing.assert_close(
            qs32[0][0, 0, 0].double() * qs32[1][0, 0].double(),
            g.pow(4).mean() ** (-1 / 8) / math.sqrt(size),
            rtol=1e-5,  # a dozen float32 roundings
            atol=0,
        )
    zero = P.initial_factors((4, 3), (True, False), 1.0, torch.float64, torch.device("cpu"), 1)
    P.initial_scale_(zero, torch.zeros_like(g))  # no information: left at the identity
    assert torch.equal(zero[0][0], torch.eye(4, dtype=torch.float64))


def test_the_initial_scale_is_set_at_the_first_step_even_without_a_fit():
    w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    opt = PSGDKron([w], preconditioner_update_probability=0.25)  # first fit at step 4
    w.grad = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(3, 2)
    opt.step()
    state = opt.state[w]
    assert state["psgd.fits"].item() == 0
    product = torch.kron(state["psgd.L"], state["psgd.R"])
    expected = w.grad.pow(4).mean() ** (-1 / 8) * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(product, expected, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize(
    "key, bad",
    [
        ("preconditioner_update_probability", 1.5),
        ("precondition_lr", 0.0),
        ("precondition_lr", 2.5),
        ("memory_save_mode", "some_diag"),
        ("max_size_triangular", -1),
        ("update_clip_rms", 0.0),
        ("seed", -3),
    ],
)
def test_bad_options_are_refused_by_name(key, bad):
    with pytest.raises(ValueError, match=key) as err:
        gd.create("psgd_kron", small_model(), **{key: bad})
    assert repr(bad) in str(err.value)


def test_copies_of_the_optimizer_draw_the_same_probes():
    # Two optimizers (two replicas, or a run and its rerun) fit identically: nothing random is
    # drawn from global state.
    results = []
    for _ in range(2):
        model = small_model()
        opt = gd.create("psgd_kron", model)
        torch.manual_seed(len(results) * 99)  # global RNG state plays no part
        train(model, opt, range(4))
        results.append([copy.deepcopy(p.detach()) for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
