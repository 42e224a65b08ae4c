"""``--nproc N``: ``bench step`` on two processes through torchrun; one-process experiments refuse.

The end-to-end run launches ``python -m torch.distributed.run --standalone`` with two CPU ranks
(gloo), like a user would, and checks that the run records both ranks' matrix-work times and
ends with the same parameters as one process.
"""

from __future__ import annotations

import json

import pytest
import torch

from guided_descent.cli.main import _without_nproc, main


def test_nproc_is_removed_from_the_relaunched_command_line():
    argv = ["bench", "step", "--nproc", "2", "--quick", "--nproc=3", "--out", "x"]
    assert _without_nproc(argv) == ["bench", "step", "--quick", "--out", "x"]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "moons", "--nproc", "2"],
        ["run", "--nproc", "2"],  # the flagship
        ["run", "--resume", "somewhere", "--nproc", "2"],
    ],
)
def test_one_process_experiments_refuse_several_processes(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and "bench step --nproc N" in err


def test_a_torchrun_launch_of_a_one_process_experiment_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main(["run", "quadratic", "--quick"])
    assert exit_.value.code == 2
    assert "runs in one process" in capsys.readouterr().err


def test_nproc_inside_a_torchrun_launch_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["bench", "step", "--quick", "--nproc", "2"])
    assert "inside a torchrun launch" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_step_on_two_processes_matches_one(tmp_path, capsys):
    names = "muon,shampoo,soap"
    common = ["bench", "step", "--quick", "--quiet", "--optimizers", names]
    threads = torch.get_num_threads()
    try:  # one thread, like each torchrun rank: bitwise comparable
        assert main(["--threads", "1", *common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["results"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["results"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for name in names.split(","):
        # Same gradients, same parameters after the timed steps: the split changed nothing.
        checksums = [run["optimizers"][name]["param_checksum"] for run in (one, two)]
        assert checksums[0] == checksums[1], name
    muon = two["optimizers"]["muon"]
    assert len(muon["precond_ms_per_rank"]) == 2 and all(t > 0 for t in muon["precond_ms_per_rank"])
    report = (tmp_path / "two" / "report.md").read_text()
    assert "Matrix work per rank (2 processes)" in report
