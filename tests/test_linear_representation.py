"""The ``linear-representation`` experiment: data, metric, update rules, the race, end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from guided_descent.experiments import linear_representation as exp
from guided_descent.experiments.linear_representation import Config
from guided_descent.tasks import linear_representation as task

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(problem: task.Problem, n: int, seed: int = 1, noise: float = 0.01):
    x, y = task.sample(problem.sigma_x_sqrt[None], problem.target[None], noise, n, [_gen(seed)])
    return x[0], y[0]


# ----------------------------------------------------------------------------------- the data


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1000.0])
def test_input_spectrum_is_log_spaced_with_trace_d(kappa):
    lam = task.input_spectrum(kappa, 50)
    assert lam.dtype == F64 and lam.shape == (50,)
    assert lam.sum().item() == pytest.approx(50.0, rel=1e-12)
    assert (lam[0] / lam[-1]).item() == pytest.approx(kappa, rel=1e-12)
    ratios = lam[1:] / lam[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-10)


def test_head_spectrum_gives_condition_kappa_f_to_ftf():
    s = task.head_spectrum(10.0, 8)
    assert s[0].item() == 1.0 and s[-1].item() == pytest.approx(10**-0.5, rel=1e-14)
    assert (s[0] ** 2 / s[-1] ** 2).item() == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize("bad", [0.5, math.inf, math.nan])
def test_spectra_reject_bad_kappa(bad):
    with pytest.raises(ValueError, match="kappa"):
        task.input_spectrum(bad, 10)


@pytest.mark.parametrize("rotated", [True, False])
def test_problem_matrices(rotated):
    p = task.make_problem(30, 4, 6, 100.0, 10.0, _gen(3), rotated=rotated)
    eye_k = torch.eye(4, dtype=F64)
    assert torch.allclose(p.g_star @ p.g_star.T, eye_k, atol=1e-12)  # orthonormal rows
    assert torch.allclose(p.sigma_x_sqrt @ p.sigma_x_sqrt, p.sigma_x, atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(p.sigma_x), p.eigenvalues.flip(0), rtol=1e-10)
    sv = torch.linalg.svdvals(p.f_star)
    assert torch.allclose(sv, task.head_spectrum(10.0, 4), rtol=1e-12)
    if not rotated:
        assert torch.allclose(p.sigma_x, torch.diag(p.eigenvalues), atol=0)


def test_empirical_covariance_matches_sigma_x():
    d, n = 20, 200_000
    p = task.make_problem(d, 3, 4, 100.0, 1.0, _gen(5))
    x, _ = _batch(p, n, seed=6)
    sigma_hat = x.T @ x / n
    # Each entry of Σ̂ - Σ averages n terms of variance at most Σ_ii Σ_jj + Σ_ij² (the Gaussian
    # value; Rademacher inputs have lighter fourth moments), so E‖Σ̂ - Σ‖_F² <= ((tr Σ)² +
    # ‖Σ‖_F²)/n. Five standard deviations of slack.
    scale = math.sqrt((p.sigma_x.trace() ** 2 + p.sigma_x.pow(2).sum()).item() / n)
    assert torch.linalg.matrix_norm(sigma_hat - p.sigma_x).item() <= 5 * scale
    # And the inputs really are Σ^{1/2} r with r in {±1}^d.
    r = torch.linalg.solve(p.sigma_x_sqrt, x[:100].T).T
    assert torch.allclose(r.abs(), torch.ones_like(r), atol=1e-8)


def test_each_seed_has_its_own_data_stream():
    p = task.make_problem(10, 2, 3, 10.0, 1.0, _gen(0))
    sq, w = p.sigma_x_sqrt[None], p.target[None]
    alone = task.sample(sq, w, 0.1, 7, [_gen(11)])
    pair = task.sample(sq.expand(2, -1, -1), w.expand(2, -1, -1), 0.1, 7, [_gen(10), _gen(11)])
    assert torch.equal(alone[0][0], pair[0][1]) and torch.equal(alone[1][0], pair[1][1])


# ---------------------------------------------------------------------------------- the metric


def test_subspace_distance_zero_one_and_invariance():
    p = task.make_problem(12, 3, 4, 10.0, 1.0, _gen(1))
    g_star = p.g_star
    assert task.subspace_distance(g_star, g_star).item() == pytest.approx(0.0, abs=1e-12)
    # Rows orthogonal to G⋆'s row space: distance 1.
    complement = torch.linalg.qr(
        torch.cat([g_star.T, torch.randn(12, 9, dtype=F64, generator=_gen(2))], 1)
    )[0][:, 3:6].T
    assert task.subspace_distance(complement, g_star).item() == pytest.approx(1.0, abs=1e-12)
    # One direction off is enough for distance 1 (the largest principal angle).
    mixed = torch.cat([g_star[:2], complement[:1]])
    assert task.subspace_distance(mixed, g_star).item() == pytest.approx(1.0, abs=1e-12)
    g = torch.randn(3, 12, dtype=F64, generator=_gen(3))
    a = torch.randn(3, 3, dtype=F64, generator=_gen(4)) + 3 * torch.eye(3, dtype=F64)
    d = task.subspace_distance(g, g_star)
    assert task.subspace_distance(a @ g, g_star).item() == pytest.approx(d.item(), rel=1e-10)
    # Against the principal-angle formula sin θ_max = sqrt(1 - σ_min(G⋆ Q_G)²).
    q = torch.linalg.qr(g.T)[0]
    sigma_min = torch.linalg.svdvals(g_star @ q).min()
    assert d.item() == pytest.approx(math.sqrt(1 - sigma_min.item() ** 2), rel=1e-8)


# ----------------------------------------------------------------------------- update rules


def _small(kappa_x=100.0, kappa_f=10.0, n=60):
    p = task.make_problem(12, 3, 5, kappa_x, kappa_f, _gen(7))
    x, y = _batch(p, n)
    gen = _gen(8)
    return p, x, y, task.init_head(5, 3, gen), task.init_first_layer(3, 12, gen)


def test_gradients_match_autograd():
    _, x, y, f, g = _small()
    fa, ga = f.clone().requires_grad_(), g.clone().requires_grad_()
    task.loss(fa, ga, x, y).backward()
    grad_f, grad_g = task.gradients(f, g, x, y)
    assert torch.allclose(fa.grad, grad_f, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ga.grad, grad_g, rtol=1e-12, atol=1e-14)


def _rel(a, b):
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


@pytest.mark.parametrize("kappa_x", [1.0, 1000.0])
def test_claim5_one_sweep_equals_alternating_least_squares(kappa_x):
    # η_G = η_F = 1, P_G = FᵀF, λ = 0, full-batch statistics (the same batch for both steps).
    _, x, y, f, g = _small(kappa_x=kappa_x)
    g1 = task.layerwise_g_step(f, g, x, y, lr=1.0, damping=0.0)
    f1 = task.layerwise_f_step(f, g1, x, y, lr=1.0, damping=0.0)
    f_ref, g_ref = task.als_sweep(f, g, x, y)
    assert _rel(g1, g_ref) <= 1e-8
    assert _rel(f1, f_ref) <= 1e-8
    # The reference really is a least-squares solution: its gradient vanishes.
    assert torch.linalg.matrix_norm(task.gradients(f, g_ref, x, y)[1]).item() < 1e-10
    assert torch.linalg.matrix_norm(task.gradients(f_ref, g_ref, x, y)[0]).item() < 1e-10


def test_f_step_from_a_zero_head_is_least_squares():
    _, x, y, _, g = _small()
    f1 = task.layerwise_f_step(torch.zeros(5, 3, dtype=F64), g, x, y, lr=1.0, damping=0.0)
    ref = torch.linalg.lstsq(x @ g.T, y).solution.T
    assert _rel(f1, ref) <= 1e-10
    # And the G-step with a zero head changes nothing (its gradient is zero), damping or not.
    g1 = task.layerwise_g_step(torch.zeros(5, 3, dtype=F64), g, x, y, lr=0.5, damping=1e-6)
    assert torch.equal(g1, g)


def test_one_sided_step_whitens_only_the_input_side():
    _, x, y, f, g = _small()
    g1 = task.layerwise_g_step(f, g, x, y, lr=0.5, damping=0.0, one_sided=True)
    grad_g = task.gradients(f, g, x, y)[1]
    expected = g - 0.5 * grad_g @ torch.linalg.inv(task.second_moment(x))
    assert _rel(g1, expected) <= 1e-10


def test_gauss_newton_matrix_is_jtj_of_the_model():
    _, x, _, f, g = _small(n=20)

    def outputs(theta):
        ff, gg = theta[:15].reshape(5, 3), theta[15:].reshape(3, 12)
        return (x @ gg.T @ ff.T).reshape(-1)

    theta = torch.cat([f.reshape(-1), g.reshape(-1)])
    jac = torch.autograd.functional.jacobian(outputs, theta)  # (B·d_Y, P)
    h = task.gauss_newton_matrix(f, g, x)
    assert torch.allclose(h, jac.T @ jac / 20, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_gauss_newton_step_is_the_dense_damped_solve(damping):
    _, x, y, f, g = _small()
    h = task.gauss_newton_matrix(f, g, x)
    mu = task.gauss_newton_damping(f, g, x, damping).item()
    assert mu == pytest.approx(damping * h.trace().item() / h.shape[0], rel=1e-12)
    grad = torch.cat([t.reshape(-1) for t in task.gradients(f, g, x, y)])
    delta = torch.linalg.solve(h + mu * torch.eye(h.shape[0], dtype=F64), grad)
    f1, g1 = task.gauss_newton_step(f, g, x, y, damping)
    ref = torch.cat([f.reshape(-1), g.reshape(-1)]) - delta
    got = torch.cat([f1.reshape(-1), g1.reshape(-1)])
    assert (got - ref).norm().item() <= 1e-9 * ref.norm().item()


def test_transfer_excess_is_zero_for_the_oracle_subspace_and_positive_otherwise():
    p = task.make_problem(12, 3, 5, 100.0, 10.0, _gen(9))
    new = task.make_transfer_task(p, _gen(10))
    assert torch.equal(new.g_star, p.g_star) and not torch.equal(new.f_star, p.f_star)
    stacked = task.TransferTask(new.sigma_x[None], new.sigma_x_sqrt[None], new.target[None])
    a = torch.randn(3, 3, dtype=F64, generator=_gen(11)) + 3 * torch.eye(3, dtype=F64)
    same, oracle = task.transfer_excess_risk(
        (a @ p.g_star)[None], p.g_star[None], stacked, 12, 0.01, 3, [_gen(12)]
    )
    assert abs(same.item()) < 1e-8 * oracle.item() + 1e-14
    off, _ = task.transfer_excess_risk(
        torch.randn(1, 3, 12, dtype=F64, generator=_gen(13)),
        p.g_star[None],
        stacked,
        12,
        0.01,
        3,
        [_gen(12)],
    )
    assert off.item() > 100 * oracle.item()


# ---------------------------------------------------------------------------- the experiment


def test_config_defaults_are_the_protocol():
    c = Config()
    assert (c.d_x, c.k, c.d_y, c.batch_size, c.noise) == (100, 8, 20, 256, 0.01)
    assert c.kappa_x == (1.0, 10.0, 100.0, 1000.0) and c.kappa_f == (1.0, 10.0)
    assert (c.eta_g, c.eta_f, c.damping, c.seeds, c.rotated) == (0.5, 1.0, 1e-6, 5, True)
    assert c.compare_at == 200 and set(c.optimizers) == set(exp.METHODS)
    assert c.damping in c.gn_dampings  # claim 4 looks at Gauss-Newton at this damping


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"optimizers": ("lbfgs",)}, "unknown method"),
        ({"kappa_x": (0.5,)}, "kappa_x"),
        ({"kappa_f": (10.0, 10.0)}, "twice"),
        ({"k": 30}, "k must be"),
        ({"compare_at": 2000}, "compare_at"),
        ({"sgd_lrs": ()}, "sgd_lrs"),
        ({"adam_lrs": (-1.0,)}, "adam_lrs"),
        ({"transfer_samples": 4}, "transfer_samples"),
        ({"noise": -0.1}, "noise"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        Config().replace(**changes)


def _tiny(**changes):
    base = dict(
        seeds=2,
        steps=30,
        kappa_x=(10.0,),
        kappa_f=(1.0,),
        d_x=12,
        k=3,
        d_y=5,
        batch_size=40,
        compare_at=10,
        transfer_samples=6,
        transfer_draws=1,
    )
    return Config(**{**base, **changes})


def test_stacked_adam_rows_are_independent_runs():
    config = _tiny()
    cell = exp.make_cell(config, 10.0, 1.0, torch.device("cpu"))
    together = exp.make_run("adam", 0.01, cell, config)
    gens = [exp._generator(s, exp._DATA) for s in range(2)]
    alone = []
    for s in range(2):
        sub = exp.Cell(
            cell.kappa_x,
            cell.kappa_f,
            *(
                t[s : s + 1]
                for t in (
                    cell.sigma_x,
                    cell.sigma_x_sqrt,
                    cell.g_star,
                    cell.target,
                    cell.g0,
                    cell.f0,
                )
            ),
            cell.problems[s : s + 1],
        )
        alone.append(exp.make_run("adam", 0.01, sub, config))
    with torch.no_grad():
        for _ in range(5):
            x, y = task.sample(cell.sigma_x_sqrt, cell.target, 0.01, 40, gens)
            b = exp.Batches(x, y, x, y, task.second_moment(x))
            together.advance(b, 0)
            for s, r in enumerate(alone):
                r.advance(exp.Batches(x[s : s + 1], y[s : s + 1], x, y, b.sigma_x[s : s + 1]), 0)
    for s, r in enumerate(alone):
        assert torch.allclose(together.g[s], r.g[0], rtol=1e-12, atol=1e-15)


def test_race_stops_only_runs_that_cannot_win():
    config = _tiny()
    cell = exp.make_cell(config, 10.0, 1.0, torch.device("cpu"))
    fast, slow, tie = (exp.make_run("sgd", lr, cell, config) for lr in (0.1, 0.01, 0.03))
    fast.reached_at = [5, 7]  # median 6 is final
    tie.reached_at = [6, None]  # median >= (6 + step + 1) / 2: could still tie only while step < 6
    exp.prune_race([fast, slow, tie], step=5, budget=30)
    assert slow.stopped_at is None and tie.stopped_at is None  # step + 1 <= 6: too early
    exp.prune_race([fast, slow, tie], step=8, budget=30)
    assert fast.stopped_at is None
    assert slow.stopped_at == 8 and tie.stopped_at == 8
    entries = [exp.run_result(r, 30) for r in (fast, slow, tie)]
    assert entries[1]["median_steps"] is None and entries[1]["status"] == ["stopped"] * 2
    assert exp.select(entries) == 0


def test_select_breaks_ties_by_final_distance_then_grid_order():
    entries = [
        {"median_steps": 10.0, "median_final_dist": 0.05},
        {"median_steps": 10.0, "median_final_dist": 0.02},
        {"median_steps": None, "median_final_dist": None},
        {"median_steps": 10.0, "median_final_dist": 0.02},
    ]
    assert exp.select(entries) == 1


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from guided_descent.cli.main import main

    out = tmp_path_factory.mktemp("linrep") / "r"
    code = main(
        ["run", "linear-representation", "--quick", "--quiet", "--threads", "1", "--out", str(out)]
    )
    assert code == 0
    return out


def test_quick_run_writes_every_file(quick_run):
    for name in (
        "config.json",
        "env.json",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "dist_vs_step.png",
        "steps_vs_kappa.png",
        "transfer.png",
    ):
        assert (quick_run / name).is_file(), name
    report = (quick_run / "report.md").read_text()
    assert report.startswith("# ") and "\n## Claims\n" in report
    links = re.findall(r"!\[[^\]]*\]\(\./([^)]+)\)", report)
    assert {"dist_vs_step.png", "steps_vs_kappa.png", "transfer.png"} <= set(links)
    assert all((quick_run / link).is_file() for link in links)


# Claims that hold with a wide margin in --quick mode (2 seeds, 300 steps), measured: layer-wise
# steps 5 (<= 50) and spread 1.1 (< 2); SGD's distance after 200 steps ~0.74 (>= 0.3); the
# layer-wise one ~0.03 (<= 0.05); Adam's ratios ~14 (>= 3) and ~60 (> 5); ALS ~1e-13 (<= 1e-8);
# transfer ratio ~0.002 (<= 0.5). 2_sgd_kappa_growth is UNDECIDED (300 steps cannot show a
# 10x growth from ~100 steps: the value is a censored lower bound near 2.5); not asserted:
# 4_gauss_newton (Gauss-Newton is only 1-3 steps slower than the layer-wise sweep, within seed
# noise at 2 seeds).
QUICK_CLAIMS = (
    "1_layerwise_steps",
    "1_layerwise_spread",
    "2_sgd_dist",
    "2_layerwise_dist",
    "3_adam_dist_ratio",
    "3_adam_steps_ratio",
    "5_als_equivalence",
    "6_transfer",
)


def test_quick_run_claims(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    claims = {c["name"]: c for c in summary["claims"]}
    assert set(QUICK_CLAIMS) | {"2_sgd_kappa_growth", "4_gauss_newton"} == set(claims)
    failed = [(n, claims[n]["value"]) for n in QUICK_CLAIMS if not claims[n]["passed"]]
    assert not failed, failed
    # Finding 7 of issue 14: the growth is a censored lower bound here, not a FAIL.
    growth = claims["2_sgd_kappa_growth"]
    assert growth["verdict"] == "UNDECIDED" and "lower bound" in growth["reason"], growth
    assert "this run's cells" in claims["1_layerwise_steps"]["statement"]
    res = summary["results"]
    for r in res["methods"].values():
        for cell in r["cells"].values():
            if r["grid"] is not None:
                assert cell["hyper"] in r["grid"]
            assert len(cell["steps"]) == res["seeds"]
    assert res["wall_seconds"] > 0 and res["torch_threads"] == 1


def test_quick_run_metrics_have_every_method(quick_run):
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert {r["method"] for r in steps} == set(exp.METHODS)
    first = [r for r in steps if r["step"] == 0]
    assert all(len(r["dist"]) == 2 for r in first)
    assert {r["method"] for r in rows if r["event"] == "run"} == set(exp.METHODS)


def test_report_re_renders_from_files(quick_run):
    from guided_descent.cli.main import main

    before = (quick_run / "report.md").read_text()
    assert main(["report", str(quick_run), "--quiet"]) == 0
    assert (quick_run / "report.md").read_text() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(tmp_path):
    from guided_descent.experiments import Progress, RunDir, execute

    config = _tiny(device="cuda")
    execute("linear-representation", config, RunDir.create(tmp_path / "r"), Progress(False))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["claims"]
