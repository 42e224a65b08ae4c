"""Interrupted runs keep their records and resume to the same results as uninterrupted ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guided_descent.cli.main import main
from guided_descent.experiments.records import MetricsWriter, RunDir, read_metrics

CLI = [sys.executable, "-m", "guided_descent"]
QUICK_QUADRATIC = ["run", "quadratic", "--quick", "--quiet", "--threads", "1"]


def _results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "summary.json").read_text())["results"]
    results.pop("wall_seconds", None)
    for cells in results["cells"].values():  # per-run timings differ between runs
        for cell in cells.values():
            cell.pop("seconds", None)
    return results


def _finals(run_dir: Path) -> int:
    return sum(1 for r in read_metrics(run_dir) if r.get("event") == "final")


def test_torn_last_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    writer = MetricsWriter(path)
    writer.write(c=3)
    writer.close()
    assert path.read_text() == '{"a": 1}\n{"c": 3}\n'


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_moons_run_resumes_to_the_uninterrupted_result(tmp_path, sig):
    args = ["run", "moons", "--quick", "--quiet", "--threads", "1"]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    total = _finals(reference)

    victim = tmp_path / "victim"
    proc = subprocess.Popen([*CLI, *args, "--out", str(victim)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while _finals(victim) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = _finals(victim)
    assert 3 <= done < total, "the run must be cut off part-way"
    assert not (victim / "summary.json").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        assert f"run --resume {victim}" in err

    assert main(["run", "--resume", str(victim), "--quiet", "--threads", "1"]) == 0
    assert _results(victim) == _results(reference)
    finals = [r for r in read_metrics(victim) if r.get("event") == "final"]
    assert len(finals) == total  # each unit recorded once, none lost, none repeated
    evals = [r for r in read_metrics(victim) if r.get("event") == "eval"]
    assert len(evals) == len([r for r in read_metrics(reference) if r.get("event") == "eval"])
    assert not (victim / "partial").exists()


def test_resume_refuses_extra_configuration_and_missing_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--resume", str(tmp_path), "--seeds", "3"])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--resume", str(tmp_path)])
    assert exc.value.code == 1 and "holds no run" in capsys.readouterr().err


def test_resume_of_a_finished_run_only_rerenders(tmp_path, capsys):
    out = tmp_path / "q"
    assert main([*QUICK_QUADRATIC, "--out", str(out)]) == 0
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary


def test_non_resumable_experiment_restarts_cleanly(tmp_path):
    out = tmp_path / "q"
    assert main([*QUICK_QUADRATIC, "--out", str(out)]) == 0
    reference = json.loads((out / "summary.json").read_text())["claims"]
    lines = len(read_metrics(out))
    (out / "summary.json").unlink()  # as if killed before the end
    assert main(["run", "--resume", str(out), "--quiet", "--threads", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["claims"] == reference
    assert len(read_metrics(out)) == lines  # replaced, not duplicated
    assert RunDir.open(out).finished
