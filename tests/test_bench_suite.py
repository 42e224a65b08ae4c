"""`guided-descent bench suite`: the leaderboard's statistics, and a quick suite end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from guided_descent.cli.main import main
from guided_descent.experiments.bench import leaderboard as lb
from guided_descent.experiments.bench_suite import Config
from guided_descent.experiments.records import FAIL, PASS, UNDECIDED, read_metrics


def _row(seconds, reached, total=10.0, steps=None):
    steps = steps or [100 if r else 1001 for r in reached]
    return {"target": {"seconds": {"per_seed": [s if r else "inf" for s, r in
                                                zip(seconds, reached, strict=True)]},
                       "steps": {"per_seed": steps}, "reached": sum(reached),
                       "reached_per_seed": list(reached)},
            "train_seconds": {"per_seed": [total] * len(seconds)}, "seeds": len(seconds)}


def test_seed_ratios_keep_the_direction_of_a_miss():
    base = _row([2.0, 2.0, 2.0], [True, True, False], total=8.0)
    mine = _row([1.0, 4.0, 1.0], [True, False, True], total=6.0)
    got = lb.seed_ratios(mine, base, "seconds")
    assert got[0] == lb.Ratio(0.5, lb.EXACT)
    assert got[1] == lb.Ratio(3.0, lb.LOWER)  # missed: its whole 6 s over AdamW's 2 s
    assert got[2] == lb.Ratio(1.0 / 8.0, lb.UPPER)  # AdamW missed: over its whole 8 s
    both = lb.seed_ratios(_row([1.0], [False]), _row([1.0], [False]), "seconds")
    assert both == [lb.Ratio(None, lb.NONE)]


def test_geometric_mean_weights_workloads_equally_and_is_reproducible():
    exact = lb.EXACT
    per = {"a": [lb.Ratio(0.5, exact)] * 3, "b": [lb.Ratio(2.0, exact), lb.Ratio(2.0, exact)]}
    got = lb.geometric_mean(per, resamples=2000)
    assert got["value"] == pytest.approx(1.0)  # exp((log 0.5 + log 2) / 2)
    assert got["low"] == pytest.approx(1.0) and got["high"] == pytest.approx(1.0)  # no spread
    noisy = {"a": [lb.Ratio(v, exact) for v in (0.4, 0.5, 0.7)],
             "b": [lb.Ratio(v, exact) for v in (0.6, 0.9, 0.8)]}
    one, two = lb.geometric_mean(noisy, resamples=2000), lb.geometric_mean(noisy, resamples=2000)
    assert one == two  # seeded
    logs = [np.log([0.4, 0.5, 0.7]).mean(), np.log([0.6, 0.9, 0.8]).mean()]
    assert one["value"] == pytest.approx(math.exp(np.mean(logs)))
    assert one["low"] <= one["value"] <= one["high"] < 1
    missing = lb.geometric_mean({**noisy, "c": [lb.Ratio(None, lb.NONE)]}, resamples=100)
    assert missing["excluded"] == ["c"] and missing["workloads"] == ["a", "b"]


def test_the_aggregate_also_carries_steps_free_of_machine_load():
    """Per optimizer, beside the time geometric mean, the same statistic over steps to target:
    a slower clock (a loaded machine) moves the first and not the second."""
    def summary(adamw_seconds, muon_seconds):
        rows = {"adamw": _row(adamw_seconds, [True] * 3, steps=[100, 100, 100]),
                "muon": _row(muon_seconds, [True] * 3, steps=[50, 40, 50])}
        return {"results": {"optimizers": rows}}

    quiet = lb.aggregate({"w": lb.workload_table(summary([2.0] * 3, [1.0, 0.8, 1.0]))})
    loaded = lb.aggregate({"w": lb.workload_table(summary([2.0] * 3, [3.0, 2.4, 3.0]))})
    steps = math.exp(np.log([0.5, 0.4, 0.5]).mean())
    assert quiet["muon"]["steps"]["value"] == pytest.approx(steps)
    assert loaded["muon"]["steps"] == quiet["muon"]["steps"]
    assert loaded["muon"]["value"] == pytest.approx(3 * quiet["muon"]["value"])
    assert quiet["muon"]["steps"]["seeds"] == 3
    assert lb.interval_outcome(quiet["muon"]["steps"], 3).verdict == PASS
    assert lb.verdict("muon", "defaults", loaded["muon"], 3).verdict == FAIL


def _agg(value, low, high, kind="exact", seeds=3):
    return {"value": value, "low": low, "high": high, "kind": kind, "seeds": seeds}


def test_leaderboard_verdicts():
    assert lb.verdict("muon", "defaults", _agg(0.5, 0.4, 0.7), 3).verdict == PASS
    assert lb.verdict("muon", "defaults", _agg(1.5, 1.2, 1.9), 3).verdict == FAIL
    assert lb.verdict("muon", "defaults", _agg(0.9, 0.6, 1.2), 3).verdict == UNDECIDED
    # A lower bound (a miss) could hide a slower run: it cannot pass, however far below 1.
    lower = lb.verdict("muon", "defaults", _agg(0.5, 0.4, 0.7, "lower"), 3)
    assert lower.verdict == UNDECIDED and "bound" in lower.reason
    assert lb.verdict("muon", "defaults", _agg(0.5, 0.4, 0.7, "upper"), 3).verdict == PASS
    assert lb.verdict("muon", "defaults", _agg(0.5, 0.4, 0.7, seeds=2), 3).verdict == UNDECIDED
    nothing = lb.verdict("muon", "defaults", {"value": None}, 3)
    assert nothing.verdict == UNDECIDED and nothing.value is None


def test_config_validates_up_front():
    with pytest.raises(ValueError, match="unknown workload"):
        Config(workloads=("nope",))
    with pytest.raises(ValueError, match="tracks"):
        Config(tracks=("fast",))
    with pytest.raises(ValueError, match="natural_gradient"):
        Config(workloads=("charlm",), optimizers=("natural_gradient",))
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        Config(jobs=0)
    with pytest.raises(ValueError, match="'cuda'"):
        Config(jobs=2, device="cuda")


@pytest.mark.slow
def test_quick_suite_end_to_end_resumes_and_publishes(tmp_path, capsys):
    """Two workloads' CI variants on both tracks (10-20 s on one thread), then an interruption
    and resume, then publishing into docs."""
    out = tmp_path / "suite"
    flags = ["bench", "suite", "--quick", "--quiet", "--threads", "1",
             "--workloads", "digits-mlp,kron-quadratic", "--out", str(out)]
    assert main(flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    res = summary["results"]
    assert set(res["tracks"]) == {"defaults", "tuned"}
    for track in ("defaults", "tuned"):
        board = res["tracks"][track]
        assert set(board["workloads"]) == {"digits-mlp", "kron-quadratic"}
        for sub in ("digits-mlp", "kron-quadratic"):
            assert (out / track / sub / "summary.json").is_file()
    names = {c["name"] for c in summary["claims"]}
    assert "leaderboard: muon vs adamw (defaults)" in names
    assert all(c["verdict"] in (PASS, FAIL, UNDECIDED) for c in summary["claims"])
    # The tuned track took the defaults track's factor-1 runs instead of training them again.
    assert res["reused_runs"] > 0
    tuned = [r for r in read_metrics(out / "tuned" / "digits-mlp") if r.get("event") == "run"]
    assert sorted({r["lr_factor"] for r in tuned}) == [0.316, 1.0, 3.16]
    report = (out / "report.md").read_text()
    assert "# Leaderboard" in report and "](./leaderboard.png)" in report
    assert (out / "leaderboard.png").stat().st_size > 1000
    assert "[full report](defaults/digits-mlp/report.md)" in report

    # A suite written by an older version (no steps aggregate): the report re-derives the
    # leaderboard from the sub-runs' files and shows it; the stored summary stays as it was.
    old = json.loads((out / "summary.json").read_text())
    for board in old["results"]["tracks"].values():
        for agg in board["aggregate"].values():
            del agg["steps"]
    (out / "summary.json").write_text(json.dumps(old))
    assert main(["report", str(out)]) == 0
    assert "steps × AdamW, geometric mean [interval]" in (out / "leaderboard.md").read_text()
    assert "In steps to target" in (out / "leaderboard.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == old

    # Interrupted inside the tuned digits-mlp run: it and the suite summary are gone.
    sub = out / "tuned" / "digits-mlp"
    rows = read_metrics(sub)
    last = max(i for i, r in enumerate(rows) if r.get("event") == "run")
    (sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:last]))
    (sub / "summary.json").unlink()
    (out / "summary.json").unlink()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    runs = [r for r in read_metrics(sub) if r.get("event") == "run"]
    assert len(runs) == len(tuned)  # only the lost run was trained again
    assert again["results"]["tracks"]["defaults"] == res["tracks"]["defaults"]

    # Published into docs: the leaderboard, its figure, the marked regions of the recipes.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "recipes.md").write_text("intro\n<!-- suite:mlp -->\nold\n<!-- /suite:mlp -->\nend\n")
    (tmp_path / "README.md").write_text("<!-- suite:headline -->\n<!-- /suite:headline -->\n")
    capsys.readouterr()
    assert main(["report", str(out), "--docs", str(docs)]) == 0
    assert capsys.readouterr().out.strip() == str(docs / "leaderboard.md")
    text = (docs / "leaderboard.md").read_text()
    assert text.startswith("# Leaderboard")  # a new page: the whole leaderboard
    assert "](figures/leaderboard.png)" in text and "`defaults/digits-mlp/report.md`" in text
    # A page with a leaderboard region keeps its written parts; the region gets the board.
    (docs / "leaderboard.md").write_text(
        "# Mine\nwritten\n<!-- suite:leaderboard -->\nPending\n<!-- /suite:leaderboard -->\n")
    assert main(["report", str(out), "--docs", str(docs)]) == 0
    text = (docs / "leaderboard.md").read_text()
    assert text.startswith("# Mine\nwritten\n") and "Pending" not in text
    assert "## Leaderboard: time to target" in text and "### Defaults track" in text
    assert (docs / "figures" / "leaderboard.png").is_file()
    recipes = (docs / "recipes.md").read_text()
    assert "old" not in recipes and "digits-mlp" in recipes and recipes.endswith("end\n")
    assert "track" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["report", str(out / "defaults" / "digits-mlp"), "--docs", str(docs)])


@pytest.mark.slow
def test_the_whole_quick_suite_runs(tmp_path):
    """Every CPU workload's CI variant on both tracks (about 40 s on one thread)."""
    out = tmp_path / "suite"
    assert main(["bench", "suite", "--quick", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "summary.json").read_text())["results"]
    for board in res["tracks"].values():
        assert set(board["workloads"]) == set(Config().workloads)
    assert "## Tuned track" in (out / "report.md").read_text()


def _evaluations(sub: Path) -> dict[tuple, list[dict]]:
    """Every run's evaluations by (optimizer, seed, lr factor), without the clock: what training
    computed."""
    out: dict[tuple, list[dict]] = {}
    for r in read_metrics(sub):
        if r.get("event") == "eval":
            kept = {k: v for k, v in r.items() if k != "train_seconds"}
            out.setdefault((r["optimizer"], r["seed"], r["lr_factor"]), []).append(kept)
    return out


@pytest.mark.slow
def test_jobs_train_workloads_side_by_side_with_the_same_results(tmp_path, capsys):
    """``--jobs 2`` trains the workloads in two spawned processes: every sub-run computes what
    the one-process suite computes (same seeds, same thread count), the tuned track still takes
    the defaults track's factor-1 runs, and the report says the timings shared the machine."""
    flags = ["bench", "suite", "--quick", "--threads", "1",
             "--workloads", "digits-mlp,kron-quadratic,digits-cnn"]
    assert main([*flags, "--quiet", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main([*flags, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    # A line as each workload ends (not all at the end), counting up.
    err = capsys.readouterr().err
    assert [line.split("(")[1] for line in err.splitlines() if " done (" in line] == [
        "1/3 workloads)", "2/3 workloads)", "3/3 workloads)"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["results"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["results"]
    assert two["jobs"] == 2 and one["jobs"] == 1
    assert two["reused_runs"] == one["reused_runs"] > 0
    for track in ("defaults", "tuned"):
        for workload in ("digits-mlp", "kron-quadratic", "digits-cnn"):
            a = _evaluations(tmp_path / "one" / track / workload)
            b = _evaluations(tmp_path / "two" / track / workload)
            assert a == b and a, (track, workload)
        assert two["tracks"][track]["lr_factors"] == one["tracks"][track]["lr_factors"]
    assert "2 workloads training at once" in (tmp_path / "two" / "leaderboard.md").read_text()
    assert "training at once" not in (tmp_path / "one" / "leaderboard.md").read_text()
