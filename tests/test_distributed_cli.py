"""``--nproc N``: ``bench step`` and ``bench train`` on two processes through torchrun;
one-process experiments refuse.

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
    assert "runs in one process" in err and "bench train --nproc N" in err


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


def test_bench_train_on_two_processes_matches_one(tmp_path):
    """Data-parallel bench train: each rank computes half of every batch, DDP averages the
    gradients, Muon/Shampoo split their matrix work -- the run is the one-process run."""
    names = "muon,shampoo,soap,kfac"
    common = ["bench", "train", "digits-mlp", "--quick", "--quiet", "--seeds", "1",
              "--optimizers", names, "--warmup-steps", "2"]
    threads = torch.get_num_threads()
    try:
        assert main(["--threads", "1", *common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["results"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["results"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert list(one["optimizers"]) == list(two["optimizers"]) == ["adamw", *names.split(",")]
    for name, row in one["optimizers"].items():
        other = two["optimizers"][name]
        # Same steps, same samples; only the summation order of the gradient differs. Measured
        # (40 steps, final test loss): AdamW identical, Muon 1e-7, K-FAC 3e-6 relative. Shampoo
        # and SOAP amplify rounding through the eigenvectors of their nearly degenerate factors:
        # summing the same batch as two halves on ONE process already moves them by 3e-3 and
        # 7e-3; two processes moved them by 6e-4 and 3e-4.
        rel = 1e-2 if name in ("shampoo", "soap") else 1e-4
        assert other["steps_done"]["median"] == row["steps_done"]["median"]
        a, b = row["final_loss"]["median"], other["final_loss"]["median"]
        assert b == pytest.approx(a, rel=rel), name
    assert "data-parallel on 2 processes" in (tmp_path / "two" / "report.md").read_text()


def test_bench_train_batch_must_split_over_the_processes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "digits-mlp", "--quick", "--batch-size", "63", "--nproc", "2"])
    assert exc.value.code == 2
    assert "does not split evenly over 2 processes" in capsys.readouterr().err
