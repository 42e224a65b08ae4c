"""The ``single-index`` experiment: data, the symmetric student, the step-one rules, step two, and
the ``--quick`` run through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from guided_descent.experiments.single_index import METHODS, Config, claims
from guided_descent.tasks import single_index as task


def _problems(kappa: float, dim: int, seeds=(0, 1)) -> task.Problems:
    return task.make_problems(kappa, dim, list(seeds))


@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0])
def test_spectrum_is_log_spaced_with_trace_d(kappa):
    lam = task.input_spectrum(kappa, 32)
    assert lam.sum().item() == pytest.approx(32.0, rel=1e-12)
    assert (lam[-1] / lam[0]).item() == pytest.approx(kappa, rel=1e-12)
    ratios = lam[1:] / lam[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-10)


def test_beta_is_a_unit_vector_and_the_rotation_orthogonal():
    p = _problems(10.0, 24, seeds=(0, 1, 2))
    assert torch.allclose(
        torch.linalg.vector_norm(p.beta, dim=-1), torch.ones(3, dtype=p.beta.dtype)
    )
    eye = torch.eye(24, dtype=torch.float64).expand(3, 24, 24)
    assert torch.allclose(p.rotation.mT @ p.rotation, eye, atol=1e-12)
    assert torch.allclose(p.covariance @ p.covariance_inverse, eye, atol=1e-10)
    # The seed alone fixes Q and β⋆: the same at another κ, different for another seed.
    q = _problems(100.0, 24, seeds=(0, 1, 2))
    assert torch.equal(p.rotation, q.rotation) and torch.equal(p.beta, q.beta)
    assert not torch.equal(p.beta[0], p.beta[1])


def test_empirical_covariance_and_labels_match_the_model():
    dim, n = 12, 200_000
    p = _problems(100.0, dim, seeds=(3,))
    r, xi = task.standard_draws([3], "test", n, dim, "cpu")
    x, y = task.sample(p, r, xi, "tanh", noise=0.1)
    emp = (x.double().mT @ x.double()) / n  # mean 0, so the second moment is the covariance
    sigma = p.covariance
    # Sampling error of a second moment is ~ ‖Σ‖_F·√(2/n) ≈ 0.3 % here.
    assert (torch.linalg.norm(emp - sigma) / torch.linalg.norm(sigma)).item() < 0.02
    resid = y.double() - torch.tanh(x.double() @ p.beta[0])
    assert resid.std().item() == pytest.approx(0.1, rel=0.02)


def test_ceiling_formula():
    cov = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)).unsqueeze(0)
    beta = torch.tensor([[1.0, 1.0]], dtype=torch.float64) / math.sqrt(2)
    # Σβ = (1, 4)/√2: cos = (1 + 4) / (√2 · √17)
    assert task.ceiling(cov, beta).item() == pytest.approx(5 / math.sqrt(34), rel=1e-12)
    # An eigenvector of Σ is not biased at all; κ = 1 never is.
    assert task.ceiling(cov, torch.tensor([[0.0, 1.0]], dtype=torch.float64)).item() == 1.0
    p = _problems(1.0, 16)
    assert torch.allclose(task.ceiling(p.covariance, p.beta), torch.ones(2, dtype=torch.float64))
    # And it matches the generic angle between Σβ and β.
    p = _problems(100.0, 16)
    sb = (p.covariance @ p.beta.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(task.ceiling(p.covariance, p.beta), task.alignment(sb, p.beta))


def test_symmetric_initialisation_gives_the_zero_function():
    dim, width = 20, 16
    w0, a = task.symmetric_init(width, dim, [0, 1])
    assert w0.shape == (2, width, dim) and a.shape == (2, width)
    assert torch.equal(w0[:, : width // 2], w0[:, width // 2 :])
    assert torch.equal(a[:, : width // 2], -a[:, width // 2 :])
    assert torch.allclose(torch.linalg.vector_norm(w0, dim=-1), torch.ones(2, width), atol=1e-6)
    x = torch.randn(2, 50, dim)
    for act in task.ACTIVATIONS:
        for bn in (False, True):
            f = task.student(w0, a, x, act, bn=bn)
            assert f.abs().max().item() < 1e-6, (act, bn)
    with pytest.raises(ValueError, match="even"):
        task.symmetric_init(15, dim, [0])


@pytest.mark.parametrize("act", task.ACTIVATIONS)
def test_gradient_sums_match_autograd_and_nest(act):
    torch.manual_seed(0)
    s, n, dim, width = 2, 40, 6, 8
    w = torch.randn(s, width, dim)
    a = torch.randn(s, width)  # not symmetric: the residual path is exercised
    x, y = torch.randn(s, n, dim), torch.randn(s, n)
    wg = w.clone().requires_grad_(True)
    loss = 0.5 * (y - task.student(wg, a, x, act)).square().mean(-1).sum()
    (ref,) = torch.autograd.grad(loss, wg)
    g_sum, xx_sum = task.gradient_sums(w, a, x, y, act)
    assert torch.allclose((-g_sum / (n * math.sqrt(width))).float(), ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(xx_sum.float(), x.mT @ x, rtol=1e-5, atol=1e-5)
    # Prefix sums from one chunked pass equal direct sums over each prefix.
    nested = task.nested_gradient_sums(w, a, x, y, [10, 40, 25], act, max_elements=3 * s * width)
    for m in (10, 25, 40):
        g, xx = task.gradient_sums(w, a, x[:, :m], y[:, :m], act)
        assert torch.allclose(nested[m][0], g, rtol=1e-5, atol=1e-6)
        assert torch.allclose(nested[m][1], xx, rtol=1e-5, atol=1e-5)


def test_batchnorm_matches_torch_and_its_gradient_splits_by_seed():
    torch.manual_seed(1)
    s, n, dim, width = 3, 30, 5, 6
    pre = torch.randn(s, n, width) * 3 + 1
    for k in range(s):
        ref = F.batch_norm(pre[k], None, None, training=True, eps=task.BATCHNORM_EPS)
        assert torch.allclose(task.batchnorm(pre)[k], ref, atol=1e-5)
    w, a = torch.randn(s, width, dim), torch.randn(s, width)
    x, y = torch.randn(s, n, dim), torch.randn(s, n)
    together = task.batchnorm_gradient(w, a, x, y, "tanh")
    # Seed groups of one (max_elements below n·N) give the same gradients.
    alone = task.batchnorm_gradient(w, a, x, y, "tanh", max_elements=1)
    assert torch.allclose(together, alone, atol=1e-6)
    wg = w[1].clone().requires_grad_(True)
    h = F.batch_norm(x[1] @ wg.T, None, None, training=True, eps=task.BATCHNORM_EPS)
    f = torch.tanh(h) @ a[1] / math.sqrt(width)
    (ref,) = torch.autograd.grad(0.5 * (y[1] - f).square().mean(), wg)
    assert torch.allclose(together[1], ref, rtol=1e-4, atol=1e-6)


def test_adam_first_step_is_sign_like():
    g = torch.tensor([[[1e-3, -2e-4, 0.0, 5e-9]]])
    step = task.adam_first_step(g, eps=1e-8)
    assert torch.allclose(step, -g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-7)
    assert step[0, 0, 0].item() == pytest.approx(-1.0, abs=1e-4)


def test_top_direction_of_a_rank_one_matrix():
    u = torch.randn(2, 9, dtype=torch.float64)
    v = torch.randn(2, 4, dtype=torch.float64)
    delta = u.unsqueeze(-1) * v.unsqueeze(-2)  # (2, 9, 4) rank one
    top, s1 = task.top_direction(delta)
    assert torch.allclose(task.alignment(top, v), torch.ones(2, dtype=torch.float64))
    expect = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
    assert torch.allclose(s1, expect, rtol=1e-10)


def test_oracle_spike_aligns_with_beta_and_sgd_spike_with_sigma_beta():
    # Many samples (n/d = 25 000), small d: the sampling noise is gone, only the bias is left.
    dim, width, n, seeds = 8, 16, 200_000, [5]
    p = _problems(100.0, dim, seeds)
    r, xi = task.standard_draws(seeds, "oracle-test", n, dim, "cpu")
    x, y = task.sample(p, r, xi, "tanh", 0.1)
    w0, a = task.symmetric_init(width, dim, seeds)
    g_sum, _ = task.gradient_sums(w0, a, x, y, "tanh")
    grad = -g_sum / (n * math.sqrt(width))
    v_oracle, _ = task.top_direction(-grad @ p.covariance_inverse)
    v_sgd, _ = task.top_direction(-grad)
    ceiling = task.ceiling(p.covariance, p.beta).item()
    assert ceiling < 0.9  # the test means something: SGD is visibly biased here
    assert task.alignment(v_oracle, p.beta).item() > 0.99
    assert task.alignment(v_sgd, p.beta).item() == pytest.approx(ceiling, abs=0.02)


def test_ridge_path_matches_least_squares_at_a_tiny_penalty():
    torch.manual_seed(2)
    n, width = 200, 5
    phi = torch.randn(1, n + 100, width)
    coef = torch.randn(width)
    y = phi @ coef + 0.7 + 0.01 * torch.randn(1, n + 100)
    train, held_out = (phi[:, :n], y[:, :n]), (phi[:, n:], y[:, n:])
    fit = task.ridge_path(*train, *held_out, *held_out, [1e-10])
    design = torch.cat([phi[0, :n], torch.ones(n, 1)], 1).double()
    sol = torch.linalg.lstsq(design, y[0, :n].double().unsqueeze(-1)).solution
    test_design = torch.cat([phi[0, n:], torch.ones(100, 1)], 1).double()
    ref = ((test_design @ sol).squeeze(-1) - y[0, n:].double()).square().mean()
    assert fit.test_mse.item() == pytest.approx(ref.item(), rel=1e-4)
    assert fit.penalty.item() == 1e-10


def test_config_validation():
    with pytest.raises(ValueError, match=r"'lbfgs'.*accepted: sgd"):
        Config(optimizers=("sgd", "lbfgs"))
    with pytest.raises(ValueError, match="steps must be 1"):
        Config(steps=2)
    with pytest.raises(ValueError, match="even"):
        Config(width=7)
    with pytest.raises(ValueError, match="target"):
        Config(target="sigmoid")
    with pytest.raises(ValueError, match="kappas"):
        Config(kappas=(0.5,))
    assert Config().optimizers == METHODS
    assert Config.quick().dim == 128 and Config.quick().width == 256
    assert Config().sample_size(4.0) == 4 * 512


def test_claims_left_out_when_their_methods_are_not_run():
    res = {
        "kappas": [1.0, 100.0],
        "psis": [16.0],
        "alignment": {"sgd": [[[0.99, 0.98]], [[0.6, 0.62]]]},
        "test_mse": {"sgd": [[[0.1, 0.1]], [[0.1, 0.1]]]},
        "ceiling": [[1.0, 1.0], [0.6, 0.61]],
    }
    assert [c.name for c in claims(res)] == ["sgd_at_ceiling"]


# The quick run's claims all pass with a margin: per claim, value vs threshold on this code at
# seeds 0-4 (deterministic given the seeds): sgd_at_ceiling -0.002 <= 0.02, preconditioned_beats_sgd
# 0.032 >= 0, isotropic_agreement 0.030 <= 0.05, batchnorm 0.151 >= 0.1, adam 0.304 >= 0.1, MSE
# ratio 0.32 < 1. Every margin is >= 0.02 in alignment, far beyond floating-point differences
# between machines, so all six are asserted.
QUICK_CLAIMS = {
    "sgd_at_ceiling",
    "preconditioned_beats_sgd",
    "isotropic_agreement",
    "batchnorm_below_preconditioned",
    "adam_below_preconditioned",
    "mse_preconditioned_below_sgd",
}


def test_quick_run_through_the_cli(tmp_path):
    from guided_descent.cli.main import main

    out = tmp_path / "r"
    assert (
        main(["run", "single-index", "--quick", "--quiet", "--threads", "1", "--out", str(out)])
        == 0
    )
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (out / name).is_file(), name
    for png in ("alignment_vs_psi.png", "test_mse_vs_psi.png"):
        assert (out / png).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    got = {c["name"]: c for c in summary["claims"]}
    assert set(got) == QUICK_CLAIMS
    failing = [c for c in got.values() if not c["passed"]]
    assert not failing, failing
    res = summary["results"]
    assert res["dim"] == 128 and res["width"] == 256 and res["seeds"] == 5
    # Every stepped method normalised to a top singular value of √N: η > 0 everywhere.
    assert all(e > 0 for m in res["eta"].values() for row in m for cell in row for e in cell)
    text = (out / "report.md").read_text()
    assert text.startswith("# ")
    assert "](./alignment_vs_psi.png)" in text and "](./test_mse_vs_psi.png)" in text
    assert "Wall-clock of the run" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stepped = len(METHODS) - 1
    assert len(rows) == 5 * 3 * (4 * stepped + 1)
