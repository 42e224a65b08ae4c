"""The ``moons`` experiment: task pieces, config validation, claims, and a quick end-to-end run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from guided_descent.experiments import Progress, RunDir, execute
from guided_descent.experiments import moons as exp
from guided_descent.experiments.moons import Config
from guided_descent.experiments.records import read_metrics
from guided_descent.optimizers import get_spec
from guided_descent.tasks import moons as task

# ----------------------------------------------------------------------------------------------
# Task pieces


def test_make_data_shapes_dtypes_and_split():
    d = task.make_data(n_samples=1000, noise=0.3, seed=0)
    assert d.x_train.shape == (800, 2) and d.x_test.shape == (200, 2)
    assert d.y_train.shape == (800,) and d.y_test.shape == (200,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == {0, 1} and set(d.y_test.tolist()) == {0, 1}
    # The split partitions exactly the points make_moons drew.
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=1000, noise=0.3, random_state=0)
    ours = np.concatenate([d.x_train.numpy(), d.x_test.numpy()])
    ref = x.astype(np.float32)
    assert np.array_equal(ours[np.lexsort(ours.T)], ref[np.lexsort(ref.T)])


def test_make_data_is_seeded():
    a, b, c = task.make_data(seed=3), task.make_data(seed=3), task.make_data(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_make_data_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_samples"):
        task.make_data(n_samples=1)
    with pytest.raises(ValueError, match="test_fraction"):
        task.make_data(test_fraction=1.0)


def test_make_mlp_is_torch_default_init_from_the_generator():
    with torch.random.fork_rng():  # keep the global RNG of other tests untouched
        torch.manual_seed(7)
        ref = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    ours = task.make_mlp(16, torch.Generator().manual_seed(7))
    for p, q in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(p, q)


def test_make_mlp_does_not_touch_the_global_rng():
    before = torch.random.get_rng_state()
    task.make_mlp(64, torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.random.get_rng_state())


def test_batch_indices_are_back_to_back_epochs():
    idx = task.batch_indices(10, 4, 6, torch.Generator().manual_seed(0))
    assert idx.shape == (6, 4)
    flat = idx.reshape(-1)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:20].tolist()) == list(range(10))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, task.MoonsData]:
    """A small network trained to separate the moons (the tests below only read it)."""
    data = task.make_data(n_samples=200, seed=1)
    model = task.make_mlp(24, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = task.loss_fn(model(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, data


def test_evaluate_matches_a_direct_computation(trained):
    model, data = trained
    loss, acc = task.evaluate(model, data.x_test, data.y_test)
    with torch.no_grad():
        logits = model(data.x_test)
    assert loss == pytest.approx(float(task.loss_fn(logits, data.y_test)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == data.y_test).float().mean()))


def test_mesh_probability_is_a_probability_on_the_grid(trained, monkeypatch):
    model, data = trained
    xs, ys = task.mesh(data.x_train, 30)
    assert xs.shape == (30,) and ys.shape == (30,)
    p = task.mesh_probability(model, xs, ys)
    assert p.shape == (30, 30)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    # A trained model is confident somewhere on each side of the boundary.
    assert float(p.min()) < 0.1 and float(p.max()) > 0.9
    # Chunking does not change the result beyond rounding: other row counts may take other GEMM
    # kernels. Each logit of the Linear-ReLU-Linear net errs by at most γ_k |W2| (|W1| |x| + |b1|)
    # + |b2| with k = 2 + 24 + 2 terms (ReLU is 1-Lipschitz); p = sigmoid(l1 - l0) moves by
    # p (1 - p) times the gap's error, plus a few roundings of p itself. Two computations: twice.
    monkeypatch.setattr(task, "CHUNK_ELEMENTS", 24 * 7)
    u = torch.finfo(torch.float32).eps / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).abs()
    with torch.no_grad():
        w1, b1 = model[0].weight.abs(), model[0].bias.abs()
        w2, b2 = model[2].weight.abs(), model[2].bias.abs()
        size = ((x @ w1.T + b1) @ w2.T + b2).sum(1).view_as(p)  # bounds |l0| + |l1| terms
    gap_error = 28 * u / (1 - 28 * u) * size
    tol = 2 * (p * (1 - p) * gap_error + 4 * u * p)
    assert ((task.mesh_probability(model, xs, ys) - p).abs() <= tol).all()


def test_boundary_smoothness_matches_the_closed_form(trained, monkeypatch):
    model, data = trained
    xs, ys = task.mesh(data.x_train, 25)
    smooth = task.boundary_smoothness(model, xs, ys)
    assert math.isfinite(smooth) and smooth > 0
    # For p = sigmoid(z), z = v . relu(W1 x + b1) + c with v = W2[1] - W2[0]:
    # grad_x p = p (1 - p) * W1^T (v * 1[W1 x + b1 > 0]).
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()
    w2, b2 = model[2].weight.detach(), model[2].bias.detach()
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    h = x @ w1.T + b1
    v = w2[1] - w2[0]
    p = torch.sigmoid(torch.relu(h) @ v + (b2[1] - b2[0]))
    grad = (p * (1 - p))[:, None] * (((h > 0) * v) @ w1)
    # Float32 throughout; the two orders of operation differ by a few γ_24 ≈ 1.4e-6 relative per
    # point (the sums run over <= 24 hidden units), far inside 1e-4 and, chunked, 1e-5.
    assert smooth == pytest.approx(float(grad.norm(dim=1).mean()), rel=1e-4)
    # Chunked the same; and the model's parameters are left without gradients.
    monkeypatch.setattr(task, "CHUNK_ELEMENTS", 24 * 11)
    assert task.boundary_smoothness(model, xs, ys) == pytest.approx(smooth, rel=1e-5)
    assert all(q.grad is None for q in model.parameters())


def test_relative_movement():
    w0 = torch.ones(3, 2)
    assert task.relative_movement(w0, w0) == 0.0
    assert task.relative_movement(2 * w0, w0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_the_protocol():
    c = Config()
    assert c.optimizers == ("sgd", "momentum", "nesterov", "adam", "adamw", "lion")
    assert c.widths == (32, 8192)
    assert (c.seeds, c.steps, c.batch_size, c.n_samples, c.noise) == (5, 1000, 64, 1000, 0.3)
    q = Config.quick()
    assert q.seeds < c.seeds and q.steps < c.steps and q.small < q.wide


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"widths": (32,)}, "at least two"),
        ({"widths": (32, 0)}, "widths"),
        ({"widths": (32, 32, 64)}, "twice"),
        ({"optimizers": ("sgd", "nosuch")}, "nosuch"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 801}, "batch_size"),
        ({"noise": -0.1}, "noise"),
        ({"mesh_resolution": 1}, "mesh_resolution"),
        ({"eval_every": 0}, "eval_every"),
        ({"n_samples": 5}, "n_samples"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        Config(**changes)


def test_config_rejects_optimizers_that_need_the_model(monkeypatch):
    spec = replace(get_spec("sgd"), needs_model=True)
    monkeypatch.setattr(exp, "get_spec", lambda name: spec)
    with pytest.raises(ValueError, match="needs the model"):
        Config(optimizers=("sgd",))


def test_config_round_trips_through_json():
    c = Config.quick()
    data = json.loads(json.dumps({k: getattr(c, k) for k in c.__dataclass_fields__}))
    assert Config.from_dict(data) == c


# ----------------------------------------------------------------------------------------------
# Claims are computed from the numbers, and can fail


def _cells(movement: dict[str, tuple[float, float]], test_acc: dict[str, float]) -> dict:
    def stat(v: float) -> dict:
        return {"median": v, "min": v, "max": v, "per_seed": [v]}

    return {
        name: {
            "32": {"movement": stat(movement[name][0]), "test_acc": stat(0.9)},
            "8192": {"movement": stat(movement[name][1]), "test_acc": stat(test_acc[name])},
        }
        for name in movement
    }


def _by_name(claims):
    return {c.name: c for c in claims}


def test_claims_pass_and_fail_with_the_numbers():
    good = _cells({"sgd": (0.5, 0.1), "adam": (0.5, 0.4)}, {"sgd": 0.9, "adam": 0.86})
    claims = _by_name(exp.claims(good, ["sgd", "adam"], 32, 8192))
    assert set(claims) == {
        "lazy_movement_sgd",
        "lazy_movement_adam",
        "lazy_movement_sgd_factor",
        "lazy_test_accuracy",
    }
    assert all(c.passed for c in claims.values())
    assert claims["lazy_test_accuracy"].value == pytest.approx(0.86)

    bad = _cells({"sgd": (0.5, 0.2), "adam": (0.5, 0.6)}, {"sgd": 0.9, "adam": 0.84})
    claims = _by_name(exp.claims(bad, ["sgd", "adam"], 32, 8192))
    assert claims["lazy_movement_sgd"].passed  # smaller, but only 2.5x
    assert not claims["lazy_movement_sgd_factor"].passed
    assert not claims["lazy_movement_adam"].passed
    assert not claims["lazy_test_accuracy"].passed


def test_claims_name_the_widths_of_a_reduced_run():
    cells = _cells({"sgd": (0.5, 0.1)}, {"sgd": 0.9})
    cells["sgd"]["2048"] = cells["sgd"].pop("8192")
    for claim in exp.claims(cells, ["sgd"], 32, 2048):
        assert "2048" in claim.statement and "8192" in claim.statement


def test_a_nan_ratio_leaves_its_claim_undecided():
    cells = _cells({"sgd": (0.0, 0.1)}, {"sgd": 0.9})
    claim = _by_name(exp.claims(cells, ["sgd"], 32, 8192))["lazy_movement_sgd"]
    assert claim.verdict == "UNDECIDED" and not claim.passed


def test_a_diverged_seed_is_reported_not_hidden(tmp_path):
    rng = np.random.default_rng(0)
    names = ["sgd", "adam"]

    def cell(diverged: bool) -> dict:
        values = {m: list(rng.uniform(0.8, 0.9, size=3)) for m in exp.FINAL_METRICS}
        if diverged:
            values["test_acc"][1] = float("nan")
        return {m: exp._stats(v) for m, v in values.items()}

    cells = {
        "sgd": {"32": cell(False), "8192": cell(True)},
        "adam": {"32": cell(False), "8192": cell(False)},
    }
    assert math.isnan(cells["sgd"]["8192"]["test_acc"]["median"])
    claims = _by_name(exp.claims(cells, names, 32, 8192))
    assert not claims["lazy_test_accuracy"].passed
    cmp = exp.compare_with_lecture(cells, names, 32, 8192)
    assert cmp["best"]["lazy"]["order"][-1] == "sgd"  # a diverged run ranks last
    # The report's discussion says so instead of calling the optimizers equal.
    from guided_descent.experiments.records import read_json, write_json
    from guided_descent.report.moons import discussion

    results = {
        "optimizers": names,
        "widths": [32, 8192],
        "small_width": 32,
        "wide_width": 8192,
        "seeds": 3,
        "cells": cells,
        "lecture": cmp,
    }
    # Through a JSON file, as the report sees it: NaN becomes null there.
    claim_dicts = [c.to_dict() for c in claims.values()]
    write_json(tmp_path / "s.json", {"results": results, "claims": claim_dicts})
    summary = read_json(tmp_path / "s.json")
    text = "\n".join(discussion(summary, {"steps": 10}, []))
    assert "diverged" in text


# ----------------------------------------------------------------------------------------------
# End to end, quick mode, through the Python API


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    from guided_descent.report import render

    run = RunDir.create(tmp_path_factory.mktemp("moons") / "r")
    # One torch thread for this run only: with two, OpenMP's workers wait on each other whenever
    # another process holds a core, and the quick run went from 8 s to over 2 min while other
    # test jobs ran. The numbers do not depend on the thread count (checked: same claims).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        execute("moons", Config.quick(), run, Progress(False))
    finally:
        torch.set_num_threads(threads)
    render(run.path)
    return run.path


def test_quick_run_writes_every_file(quick_run):
    for name in (
        "config.json",
        "env.json",
        "metrics.jsonl",
        "summary.json",
        "boundaries.npz",
        "report.md",
        "boundaries.png",
        "loss_curves.png",
        "movement.png",
    ):
        assert (quick_run / name).is_file(), name
        assert (quick_run / name).stat().st_size > 0, name


def test_quick_run_summary_and_claims(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    claims = summary["claims"]
    assert claims
    for c in claims:
        assert {"name", "statement", "value", "threshold", "passed"} <= set(c)
    by_name = {c["name"]: c for c in claims}
    q = Config.quick()
    expected = {f"lazy_movement_{o}" for o in q.optimizers}
    expected |= {"lazy_movement_sgd_factor", "lazy_test_accuracy"}
    assert set(by_name) == expected
    # Every claim holds in quick mode with room to spare (measured: movement ratios <= 0.72,
    # sgd factor 6.4 against 4, lowest median test accuracy 0.8775 against 0.85).
    failed = [(c["name"], c["value"]) for c in claims if not c["passed"]]
    assert not failed, failed

    res = summary["results"]
    assert res["widths"] == list(q.widths) and res["seeds"] == q.seeds
    for o in q.optimizers:
        for w in q.widths:
            cell = res["cells"][o][str(w)]
            for m in exp.FINAL_METRICS:
                assert len(cell[m]["per_seed"]) == q.seeds
                assert cell[m]["min"] <= cell[m]["median"] <= cell[m]["max"]
    cmp = res["lecture"]
    assert cmp["in_range_total"] == len(q.optimizers) * 2 * len(exp.TABLE_METRICS)
    assert cmp["widths"]["match"] is False  # quick mode's wide network is not 8192
    assert set(cmp["best"]) == {"small", "lazy"}
    assert cmp["best"]["lazy"]["lecture_best"] == "adam"
    assert cmp["best"]["small"]["lecture_best"] == "adamw"


def test_quick_run_metrics_and_boundaries(quick_run):
    q = Config.quick()
    rows = read_metrics(quick_run)
    finals = [r for r in rows if r["event"] == "final"]
    assert len(finals) == len(q.optimizers) * len(q.widths) * q.seeds
    evals = [r for r in rows if r["event"] == "eval"]
    steps = {r["step"] for r in evals}
    assert {0, q.eval_every, q.steps} <= steps
    with np.load(quick_run / "boundaries.npz", allow_pickle=False) as npz:
        for o in q.optimizers:
            for w in q.widths:
                p = npz[exp.boundary_key(o, w)]
                assert p.shape == (q.mesh_resolution, q.mesh_resolution)
                assert 0.0 <= p.min() and p.max() <= 1.0
        assert npz["x_train"].shape[1] == 2 and npz["x_test"].shape[1] == 2


def test_quick_report(quick_run):
    text = (quick_run / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# ") and sum(line.startswith("# ") for line in lines) == 1
    for name in ("boundaries.png", "loss_curves.png", "movement.png"):
        assert f"](./{name})" in text
    assert "## Claims" in text and "## Discussion" in text
    assert "SGD+Nesterov" in text  # the lecture's row labels
    # Re-rendering reads the files again and gives the same report.
    from guided_descent.report import render

    assert render(quick_run).read_text() == text
