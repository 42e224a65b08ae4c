"""``optimizer.diagnostics()``: schema, update RMS against the step actually taken, ages,
condition numbers, and the pure functions the numbers come from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import guided_descent as gd
from guided_descent.linalg import condition_number, inverse_root
from guided_descent.linalg.eigenbasis import refresh_eigenbasis
from guided_descent.optimizers.guard import DIAGNOSTIC_KEYS
from guided_descent.preconditioners.natural_gradient import conjugate_gradient

NAMES = list(gd.optimizers())
F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def mlp(dtype=F64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
    ).to(dtype)


def data(dtype=F64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=dtype)
    return x, torch.randn(16, 2, generator=g, dtype=dtype)


# Natural gradient must be told the training loss: step() below trains a mean squared error.
REQUIRED: dict[str, dict[str, str]] = {"natural_gradient": {"loss": "mse"}}


def create(name: str, model: nn.Module, **hp) -> torch.optim.Optimizer:
    return gd.create(name, model, **{**REQUIRED.get(name, {}), **hp})


def step(model, opt, x, y) -> None:
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_schema_is_complete_and_strict_json(name):
    model = mlp(torch.float32)
    opt = create(name, model)
    x, y = data(torch.float32)
    for _ in range(3):
        step(model, opt, x, y)
    report = opt.diagnostics()
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN/Infinity tokens
    assert report["optimizer"] == opt.STATE_NAME and report["state_format"] == 1
    assert report["on_nonfinite"] == "skip"
    assert (report["steps"], report["skipped_steps"], report["last_skip"]) == (3, 0, None)
    entries = report["params"]
    order = [p for g in opt.param_groups for p in g["params"]]
    assert [e["index"] for e in entries] == list(range(len(order)))
    for entry, p in zip(entries, order, strict=True):
        assert set(DIAGNOSTIC_KEYS) <= set(entry)
        assert entry["shape"] == list(p.shape) and entry["dtype"] == "float32"
        assert entry["update_rms"] is not None and entry["update_rms"] >= 0
        assert entry["failures"] == 0
        if entry["condition_number"] is not None:
            assert entry["condition_number"] >= 1.0
    if gd.optimizers()[name].needs_model:  # names come from the model it hooks into
        assert [e["name"] for e in entries][:2] == ["0.weight", "0.bias"]


@pytest.mark.parametrize("name", NAMES)
def test_update_rms_is_the_rms_of_the_step_taken(name):
    spec = gd.optimizers()[name]
    model = mlp()
    hp = {"weight_decay": 0.0} if "weight_decay" in spec.hyperparams else {}
    opt = create(name, model, **hp)
    x, y = data()
    order = [p for g in opt.param_groups for p in g["params"]]
    # Adafactor scales its step by the parameter's RMS *before* the step; from state we only
    # see the one after, an O(lr) relative difference (see guided_descent.optimizers.diagnostics).
    rtol = 2e-2 if name == "adafactor" else 1e-6
    for _ in range(4):
        before = [p.detach().clone() for p in order]
        step(model, opt, x, y)
        for entry, p, b in zip(opt.diagnostics()["params"], order, before, strict=True):
            taken = (p.detach() - b).pow(2).mean().sqrt().item()
            assert entry["update_rms"] == pytest.approx(taken, rel=rtol, abs=1e-14), entry


def test_rules_that_need_the_gradient_report_none_after_zero_grad():
    model = mlp()
    opt = gd.create("sgd", model)
    step(model, opt, *data())
    assert opt.diagnostics()["params"][0]["update_rms"] is not None
    opt.zero_grad()
    assert opt.diagnostics()["params"][0]["update_rms"] is None
    momentum = gd.create("momentum", model)  # from its buffer alone
    step(model, momentum, *data())
    momentum.zero_grad()
    assert momentum.diagnostics()["params"][0]["update_rms"] is not None


@pytest.mark.parametrize(
    "name, hp, kind",
    [
        ("shampoo", dict(precondition_frequency=3), "kronecker"),
        ("soap", dict(precondition_frequency=3), "eigenbasis"),
        ("kfac", dict(inverse_frequency=3), "kfac"),
    ],
)
def test_preconditioner_age_counts_steps_since_the_refresh(name, hp, kind):
    model = mlp()
    opt = create(name, model, **hp)
    x, y = data()
    ages = []
    for _ in range(7):
        step(model, opt, x, y)
        entry = next(e for e in opt.diagnostics()["params"] if e["shape"] == [8, 8])
        assert entry["preconditioner"] == kind
        ages.append(entry["preconditioner_age"])
    # Shampoo starts at its first refresh and refreshes on steps 3 and 6 (no root before step
    # 3: no age); SOAP computes its basis with the first gradient and refreshes every 3 Adam
    # steps (its step count starts one later); K-FAC on steps 1, 4, 7.
    expected = {"shampoo": [None, None, 0, 1, 2, 0, 1], "soap": [0, 1, 2, 0, 1, 2, 0],
                "kfac": [0, 1, 2, 0, 1, 2, 0]}[name]
    assert ages == expected
    assert entry["condition_number"] > 1.0


def test_ages_and_failures_survive_a_state_dict_round_trip():
    model = mlp()
    opt = gd.create("shampoo", model, precondition_frequency=5)
    x, y = data()
    for _ in range(3):
        step(model, opt, x, y)
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    resumed = gd.create("shampoo", twin, precondition_frequency=5)
    resumed.load_state_dict(opt.state_dict())
    before = {e["index"]: e for e in opt.diagnostics()["params"]}
    for e in resumed.diagnostics()["params"]:
        assert e["preconditioner_age"] == before[e["index"]]["preconditioner_age"]
        assert e["failures"] == before[e["index"]]["failures"]
        if e["preconditioner"] is not None:  # observed by the process that stepped
            assert e["condition_number"] is None and e["update_rms"] is None


def test_natural_gradient_reports_its_solve():
    model = mlp()
    opt = gd.create("natural_gradient", model, loss="mse", cg_iterations=30)
    step(model, opt, *data())
    solve = opt.diagnostics()["last_solve"]
    assert set(solve) == {"iterations", "relative_residual", "converged", "breakdown",
                          "condition_estimate"}
    assert solve["condition_estimate"] > 1.0 and not solve["breakdown"]
    entries = opt.diagnostics()["params"]
    assert {e["condition_number"] for e in entries} == {solve["condition_estimate"]}


# ------------------------------------------------------------------------ the numbers' sources


def test_condition_number_of_spectra():
    vals = torch.tensor([[1.0, 10.0, 100.0], [2.0, 2.0, 2.0]], dtype=F64)
    torch.testing.assert_close(condition_number(vals), torch.tensor([100.0, 1.0], dtype=F64))
    singular = condition_number(torch.tensor([0.0, -1e-9, 3.0]))
    assert singular.item() == pytest.approx(1 / torch.finfo(torch.float32).eps)  # capped
    assert math.isnan(condition_number(torch.zeros(4)).item())


def test_inverse_root_returns_the_damped_spectrum_it_used():
    A = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=F64))
    root, spectrum = inverse_root(A, 2, 1e-2, return_eigenvalues=True)
    torch.testing.assert_close(spectrum, torch.tensor([0.01, 1.01, 4.01], dtype=F64))
    torch.testing.assert_close(root, inverse_root(A, 2, 1e-2))


def spd(n: int, top: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.logspace(0, math.log10(top), n, dtype=F64)) @ Q.T


def test_rayleigh_estimates_converge_to_the_eigenvalues():
    P = spd(6, 1e3, seed=2)
    Q = torch.eye(6, dtype=F64)
    for _ in range(200):
        result, estimates = refresh_eigenbasis(P, Q, return_estimates=True)
        Q = result.basis
    torch.testing.assert_close(
        estimates, torch.linalg.eigvalsh(P).flip(0), rtol=1e-8, atol=0
    )


def test_cg_lanczos_estimate_approaches_the_condition_number():
    A = spd(30, 1e4, seed=3)
    b = torch.randn(30, dtype=F64, generator=torch.Generator().manual_seed(4))
    _, few = conjugate_gradient(lambda v: A @ v, b, max_iterations=5, tolerance=0.0)
    _, many = conjugate_gradient(lambda v: A @ v, b, max_iterations=60, tolerance=1e-13)
    assert 1.0 < few.condition_estimate < many.condition_estimate  # Ritz values widen
    assert many.condition_estimate == pytest.approx(1e4, rel=1e-3)
