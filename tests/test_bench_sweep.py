"""The order in which ``bench train`` trains its units, and what a failing optimizer does.

``run_one`` is replaced by a stand-in that records the order of calls and returns a final loss
per (optimizer, factor), so these tests check the scheduling alone, in milliseconds."""

from __future__ import annotations

import pytest

from guided_descent.experiments.bench import sweep
from guided_descent.experiments.bench_train import Config

LOSS = {("adamw", 1.0): 0.5, ("adamw", 3.16): 0.3, ("muon", 1.0): 0.2, ("muon", 3.16): 0.4,
        ("adamw", 0.316): 0.9, ("muon", 0.316): 0.9}


class _Bar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@pytest.fixture
def calls(monkeypatch):
    order: list[tuple[str, int, float]] = []

    def fake_run_one(config, problem, name, seed, factor, metrics, device=None):
        if name == "broken":
            raise RuntimeError("boom")
        order.append((name, seed, factor))
        return {"optimizer": name, "seed": seed, "lr_factor": factor, "finite": True,
                "final": {"test_loss": LOSS[name, factor] + seed / 100}}

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    return order


def _config(**kw) -> Config:
    return Config(task="digits-mlp", ci=True, **kw)


def test_defaults_track_runs_seed_by_seed_every_optimizer_in_turn(calls):
    runs, chosen, tried = sweep.run_all(_config(seeds=3), {0: None, 1: None, 2: None},
                                        ["adamw", "muon"], (1.0,), None, _Bar(), None)
    assert calls == [("adamw", 0, 1.0), ("muon", 0, 1.0), ("adamw", 1, 1.0), ("muon", 1, 1.0),
                     ("adamw", 2, 1.0), ("muon", 2, 1.0)]
    assert [r["seed"] for r in runs["muon"]] == [0, 1, 2]
    assert chosen == {"adamw": 1.0, "muon": 1.0}


def test_tuned_track_sweeps_seed_0_factor_by_factor_then_the_other_seeds_at_each_best(calls):
    factors = (0.316, 1.0, 3.16)
    done = {("adamw", 0, 1.0): {"optimizer": "adamw", "seed": 0, "lr_factor": 1.0,
                                "finite": True, "final": {"test_loss": 0.5}}}
    runs, chosen, tried = sweep.run_all(_config(seeds=2, lr_sweep=True), {0: None, 1: None},
                                        ["adamw", "muon"], factors, None, _Bar(), None, done)
    # AdamW's factor-1 run was finished before (resumed), so it is not trained again.
    assert calls == [("adamw", 0, 0.316), ("muon", 0, 0.316), ("muon", 0, 1.0),
                     ("adamw", 0, 3.16), ("muon", 0, 3.16), ("adamw", 1, 3.16), ("muon", 1, 1.0)]
    assert chosen == {"adamw": 3.16, "muon": 1.0}
    assert tried["muon"] == {"0.316": 0.9, "1": 0.2, "3.16": 0.4}
    assert [(r["seed"], r["lr_factor"]) for r in runs["adamw"]] == [(0, 3.16), (1, 3.16)]


def test_a_failure_drops_that_optimizer_only_when_the_caller_says_so(calls):
    dropped = []

    def failed(name, error):
        dropped.append((name, str(error)))
        return True

    runs, chosen, _ = sweep.run_all(_config(seeds=2), {0: None, 1: None},
                                    ["adamw", "broken", "muon"], (1.0,), None, _Bar(), None,
                                    failed=failed)
    assert dropped == [("broken", "boom")] and set(runs) == set(chosen) == {"adamw", "muon"}
    assert ("muon", 1, 1.0) in calls
    with pytest.raises(RuntimeError, match="boom"):
        sweep.run_all(_config(seeds=1), {0: None}, ["adamw", "broken"], (1.0,), None, _Bar(),
                      None)
    with pytest.raises(RuntimeError, match="boom"):
        sweep.run_all(_config(seeds=1), {0: None}, ["broken"], (1.0,), None, _Bar(), None,
                      failed=lambda name, error: False)
