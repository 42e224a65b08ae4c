"""The guided-descent command: listing, running, re-rendering, and what bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import guided_descent as gd
from guided_descent.cli.main import main
from guided_descent.experiments import BENCHMARKS, EXPERIMENTS, FLAGSHIP


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "guided_descent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_list_names_every_experiment_benchmark_and_optimizer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*EXPERIMENTS, *BENCHMARKS, *gd.optimizers()]:
        assert f"  {name} " in out
    assert len(out.splitlines()) == 3 + len(EXPERIMENTS) + len(BENCHMARKS) + len(gd.optimizers())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nosuch"], "invalid choice: 'nosuch'"),
        (["run", "moons", "--seeds", "zero"], "--seeds expects int"),
        (["run", "moons", "--seeds", "0"], "seeds must be an integer >= 1, got 0"),
        (["run", "moons", "--optimizers", "adma"], "unknown optimizer 'adma'"),
        (["run", "quadratic", "--steps", "-5"], "steps must be an integer >= 1, got -5"),
        (["run", "moons", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_usage_and_no_traceback(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err
    assert "Traceback" not in err


def test_cuda_on_a_machine_without_it_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["run", "moons", "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = cli("run", "quadratic", "--quick", "--quiet", "--out", str(blocker / "run"))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guided-descent: error: cannot write the run")


def test_an_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["run", "quadratic", "--quick", "--quiet", "--out", str(out)])
    assert exc.value.code == 1
    assert (out / "config.json").read_text() == "{}"


def test_report_of_a_missing_directory_is_a_one_line_error(tmp_path):
    res = cli("report", str(tmp_path / "nope"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "is not a directory" in res.stderr


def _check_run(run_dir: Path) -> list[dict]:
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("*.png")), "no figures"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["guided_descent"] == gd.__version__
    claims = json.loads((run_dir / "summary.json").read_text())["claims"]
    assert claims
    for claim in claims:
        assert {"name", "statement", "value", "threshold", "verdict", "reason",
                "passed"} <= set(claim)
    report = (run_dir / "report.md").read_text()
    for png in run_dir.glob("*.png"):
        assert f"./{png.name}" in report, f"{png.name} not shown in the report"
    # Every file gets a new file's usual mode (the child inherits this process's umask).
    umask = os.umask(0)
    os.umask(umask)
    for path in run_dir.iterdir():
        if path.is_file():
            got = path.stat().st_mode & 0o777
            assert got == 0o666 & ~umask, (path.name, oct(got))
    return claims


@pytest.mark.slow
def test_flagship_quick_run_end_to_end_and_report_rerenders(tmp_path):
    out = tmp_path / "flagship"
    res = cli("run", "--quick", "--quiet", "--threads", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    report = Path(res.stdout.strip().splitlines()[-1])
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    for name in FLAGSHIP:
        claims = _check_run(out / name)
        assert f"({name}/report.md)" in text
        failing = [c["name"] for c in claims if c["verdict"] == "FAIL"]
        assert not failing, f"{name} quick-mode claims failed: {failing}"
    # The "when AdamW is not enough" comparison decides its claims from its own run.
    verdicts = {c["name"]: c["verdict"] for c in _check_run(out / "linear-representation")}
    assert verdicts["3_adam_steps_ratio"] == "PASS" and verdicts["2_sgd_dist"] == "PASS"
    # Images of the sub-reports are re-rooted so the index shows them.
    assert "](moons/" in text and "](quadratic/" in text and "](linear-representation/" in text

    # `report` redraws from the files alone: remove the outputs, keep the data.
    metrics = (out / "moons" / "metrics.jsonl").read_bytes()
    for png in out.rglob("*.png"):
        png.unlink()
    for md in out.rglob("report.md"):
        md.unlink()
    res = cli("report", str(out))
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == out / "report.md"
    assert (out / "moons" / "metrics.jsonl").read_bytes() == metrics
    for name in FLAGSHIP:
        _check_run(out / name)
