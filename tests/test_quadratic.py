"""The ``quadratic`` experiment: the problem, the tuned constants, the counting loop, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import guided_descent as gd
from guided_descent.experiments import Progress, RunDir, execute
from guided_descent.experiments.quadratic import (
    METHODS,
    REACHED,
    STOPPED,
    Config,
    Track,
    solve,
)
from guided_descent.tasks import quadratic as task


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e4])
def test_hessian_has_the_requested_spectrum(kappa):
    p = task.make_problem(kappa, dim=40, seed=3)
    lam = p.eigenvalues
    assert lam[0].item() == 1.0 / kappa and lam[-1].item() == 1.0
    # Log-spaced: consecutive ratios are all equal.
    ratios = lam[1:] / lam[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    assert torch.allclose(p.hessian, p.hessian.T, rtol=0, atol=0)
    got = torch.linalg.eigvalsh(p.hessian)
    # Building H = Q Λ Qᵀ and eigvalsh are both backward stable (errors ~p(n) u ‖H‖, p(n) <= 8n
    # allowed as in test_linalg_matrix_functions); by Weyl every eigenvalue moves by at most the
    # same *absolute* amount, 2 * 8 n u ‖H‖ = 7e-14 for n = 40, small or large eigenvalue alike.
    u = torch.finfo(torch.float64).eps / 2
    assert (got - lam).abs().max() <= 2 * 8 * 40 * u * lam.max()
    assert p.hessian.dtype == torch.float64


def test_rotation_is_orthogonal_and_seeded():
    a = task.make_problem(100.0, dim=30, seed=7)
    b = task.make_problem(1000.0, dim=30, seed=7)
    c = task.make_problem(100.0, dim=30, seed=8)
    q = a.rotation
    assert torch.allclose(q.T @ q, torch.eye(30, dtype=torch.float64), atol=1e-12)
    # Same seed: same rotation and start at every κ; another seed: different ones.
    assert torch.equal(a.rotation, b.rotation) and torch.equal(a.theta0, b.theta0)
    assert not torch.equal(a.rotation, c.rotation)


@pytest.mark.parametrize("bad", [0.5, math.inf, math.nan])
def test_spectrum_rejects_bad_kappa(bad):
    with pytest.raises(ValueError, match="kappa"):
        task.spectrum(bad, 10)


def test_optimal_constants_closed_form():
    mu, L = 0.01, 1.0  # κ = 100, √κ = 10
    assert task.gd_constants(mu, L) == {"lr": 1.0}
    hb = task.heavy_ball_constants(mu, L)
    assert hb["lr"] == pytest.approx(4.0 / 1.1**2, rel=1e-14)
    assert hb["momentum"] == pytest.approx((9.0 / 11.0) ** 2, rel=1e-14)
    ne = task.nesterov_constants(mu, L)
    assert ne == {"lr": pytest.approx(1.0), "momentum": pytest.approx(9.0 / 11.0, rel=1e-14)}
    with pytest.raises(ValueError, match="mu"):
        task.heavy_ball_constants(2.0, 1.0)


def test_heavy_ball_constants_put_every_mode_on_the_optimal_circle():
    # Per eigenvalue λ the heavy-ball recursion is linear with matrix [[1+β-ηλ, -β], [1, 0]];
    # with the optimal constants every λ in [μ, L] has spectral radius √β = (√κ-1)/(√κ+1).
    mu, L = 1e-3, 1.0
    c = task.heavy_ball_constants(mu, L)
    eta, beta = c["lr"], c["momentum"]
    for lam in torch.logspace(-3, 0, 25, dtype=torch.float64).tolist():
        m = torch.tensor([[1 + beta - eta * lam, -beta], [1.0, 0.0]], dtype=torch.float64)
        radius = torch.linalg.eigvals(m).abs().max().item()
        assert radius == pytest.approx(math.sqrt(beta), rel=1e-6)


def test_torch_momentum_is_polyaks_heavy_ball():
    n, steps = 8, 20
    p = task.make_problem(50.0, dim=n, seed=0)
    c = task.heavy_ball_constants(p.mu, p.L)
    eta, beta = c["lr"], c["momentum"]
    # torch's buffer form and the textbook form are equal in exact arithmetic. In float64 each
    # step of each rounds H θ (n terms, ‖H‖₂ = 1) and ~4 vector operations: <= (n + 4) u ‖θ‖ per
    # step; the recursion carries an error on, growing it by at most G = max ‖M_λ^k‖₂ over the
    # eigenvalues λ of H and k <= steps, M_λ = [[1 + β - ηλ, -β], [1, 0]] (in H's eigenbasis the
    # recursion is these 2x2 blocks). Two computations: twice that.
    u = torch.finfo(torch.float64).eps / 2
    G = max(
        torch.linalg.matrix_norm(
            torch.linalg.matrix_power(
                torch.tensor([[1 + beta - eta * lam, -beta], [1.0, 0.0]], dtype=torch.float64), k
            ),
            ord=2,
        ).item()
        for lam in p.eigenvalues.tolist()
        for k in range(steps + 1)
    )
    theta = p.theta0.clone()
    opt = gd.create("momentum", [theta], **c)
    prev, cur = p.theta0.clone(), p.theta0.clone()
    largest = p.theta0.norm().item()
    for k in range(1, steps + 1):
        theta.grad = task.gradient(p.hessian, theta)
        opt.step()
        nxt = cur - eta * task.gradient(p.hessian, cur) + beta * (cur - prev)
        prev, cur = cur, nxt
        largest = max(largest, cur.norm().item())
        assert (theta - cur).norm() <= 2 * k * (n + 4) * u * G * largest


@pytest.mark.parametrize("kappa", [10.0, 1e4])
def test_newton_step_lands_on_the_minimiser(kappa):
    p = task.make_problem(kappa, dim=60, seed=1)
    theta1 = task.newton_step(p.hessian, p.theta0)
    # A backward-stable solve errs by ~κ p(n) u relative: 6.7e-11 for κ = 1e4, n = 60, p(n) = n.
    assert task.relative_error(theta1, p.theta0).item() < 1e-10


def test_gradient_and_loss_agree_with_autograd():
    p = task.make_problem(30.0, dim=12, seed=2)
    theta = p.theta0.clone().requires_grad_(True)
    task.loss(p.hessian, theta).backward()
    assert torch.allclose(theta.grad, task.gradient(p.hessian, p.theta0), rtol=1e-12)


def _track(method, kappa, hyper, hessians, theta0, tol=1e-6, budget=10_000):
    return Track(method, kappa, hyper, hessians, theta0, tol, budget)


@pytest.mark.parametrize("kappa", [5.0, 50.0])
def test_gd_count_matches_the_closed_form(kappa):
    # θ₀ along the slowest eigenvector of an axis-aligned A: GD's error is exactly (1 - 1/κ)^t.
    lam = task.spectrum(kappa, 6)
    hessians = torch.diag(lam).unsqueeze(0)  # (1, 6, 6)
    theta0 = torch.zeros(1, 6, dtype=torch.float64)
    theta0[0, 0] = 2.0
    tr = _track("sgd", kappa, task.gd_constants(1 / kappa, 1.0), hessians, theta0)
    solve([tr], budget=10_000)
    expected = task.gd_iterations(kappa, 1e-6)
    assert tr.status == [REACHED]
    assert abs(tr.iterations[0] - expected) <= 2, (tr.iterations, expected)


def test_rows_of_a_track_are_independent_runs():
    probs = [task.make_problem(100.0, dim=20, seed=s) for s in range(3)]
    hessians = torch.stack([p.hessian for p in probs])
    theta0 = torch.stack([p.theta0 for p in probs])
    hyper = task.heavy_ball_constants(0.01, 1.0)
    together = _track("momentum", 100.0, hyper, hessians, theta0)
    solve([together], budget=10_000)
    for s in range(3):
        alone = _track("momentum", 100.0, hyper, hessians[s : s + 1], theta0[s : s + 1])
        solve([alone], budget=10_000)
        assert alone.iterations == [together.iterations[s]]


def test_budget_exhausted_counts_budget_plus_one():
    probs = [task.make_problem(1e3, dim=10, seed=s) for s in range(2)]
    hessians = torch.stack([p.hessian for p in probs])
    theta0 = torch.stack([p.theta0 for p in probs])
    tr = _track("sgd", 1e3, {"lr": 1.0}, hessians, theta0, budget=50)
    solve([tr], budget=50)
    assert tr.status == ["not reached", "not reached"]
    assert tr.counts() == [51, 51]


def test_learning_rate_race_picks_the_same_winner_as_running_everything():
    probs = [task.make_problem(100.0, dim=20, seed=s) for s in range(3)]
    hessians = torch.stack([p.hessian for p in probs])
    theta0 = torch.stack([p.theta0 for p in probs])
    lrs = (0.03, 0.1, 0.3, 1.0)
    budget = 3000

    def grid():
        return [_track("adam", 100.0, {"lr": lr}, hessians, theta0, budget=budget) for lr in lrs]

    full, raced = grid(), grid()
    solve(full, budget=budget)
    solve(raced, budget=budget, races=[raced])
    assert all(t.ended for t in full)

    def best(tracks):
        done = [t for t in tracks if t.stopped_at is None]
        return min(done, key=lambda t: t.final_median())

    assert best(raced).hyper == best(full).hyper
    assert best(raced).counts() == best(full).counts()
    assert any(STOPPED in t.status for t in raced)  # the race did cut something


def test_config_validation():
    with pytest.raises(ValueError, match=r"'lbfgs'.*accepted: sgd, momentum"):
        Config(optimizers=("sgd", "lbfgs"))
    with pytest.raises(ValueError, match="at least two different"):
        Config(kappas=(10.0,))
    with pytest.raises(ValueError, match="tol"):
        Config(tol=1.5)
    with pytest.raises(ValueError, match="adam_lrs"):
        Config(adam_lrs=(0.1, -1.0))
    assert Config().optimizers == METHODS
    assert max(Config.quick().kappas) <= 1e3 + 1e-9


def test_quick_run_end_to_end(tmp_path):
    run = RunDir.create(tmp_path / "r")
    execute("quadratic", Config.quick(), run, Progress(False))
    from guided_descent.report import render

    report = render(run.path)
    summary = json.loads((run.path / "summary.json").read_text())
    claims = {c["name"]: c for c in summary["claims"]}
    assert set(claims) == {"gd_slope", "heavy_ball_slope", "newton_one_step"}
    for c in claims.values():
        assert {"name", "statement", "value", "threshold", "passed"} <= set(c)
        assert c["passed"], c
    res = summary["results"]
    assert set(res["methods"]) == set(METHODS)
    assert len(res["methods"]["adam"]["chosen_lr"]) == len(res["kappas"])
    text = report.read_text()
    assert report.name == "report.md" and text.startswith("# ")
    assert "](./iterations_vs_kappa.png)" in text
    assert (run.path / "iterations_vs_kappa.png").stat().st_size > 0
    assert (run.path / "convergence.png").stat().st_size > 0
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in rows} == {"run", "curve"}
