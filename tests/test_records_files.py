"""Run-directory files get the permissions of any file a program writes: 0666 & ~umask.

The atomic writes go through a temporary file; ``tempfile.mkstemp`` would create it 0600 and
``os.replace`` would keep that, leaving summaries, reports and figures unreadable to the group
and to others (a shared results folder, a web server).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guided_descent.experiments.records import RunDir, write_atomic, write_json
from guided_descent.report.figures import pyplot, save_figure


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_summary_report_and_figure_get_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    run = RunDir.create(tmp_path / "run")
    run.write_summary({"loss": 0.5}, [])
    write_atomic(run.file("report.md"), "# report\n")
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, run.file("curve.png"))
    for name in ("summary.json", "report.md", "curve.png"):
        assert mode(run.path / name) == expected, (name, oct(mode(run.path / name)))
    # The plain append-mode metrics file agrees: the atomic writes are no special case.
    with run.metrics() as metrics:
        metrics.write(step=0)
    assert mode(run.path / "metrics.jsonl") == expected
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []


def test_overwriting_keeps_the_umask_mode_and_leaves_no_temporary(tmp_path, umask):
    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
    assert mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_removes_its_temporary(tmp_path):
    with pytest.raises(TypeError):  # fails in f.write, after the temporary file exists
        write_atomic(tmp_path / "x.json", 5)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_env_records_what_muons_default_dtype_was_chosen_from():
    from guided_descent.experiments.records import environment
    from guided_descent.linalg.newton_schulz import cpu_bf16_matmul

    env = environment("cpu")
    assert env["cpu_bf16_matmul"] is cpu_bf16_matmul()
