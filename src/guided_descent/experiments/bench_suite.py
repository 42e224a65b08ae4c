"""``guided-descent bench suite``: every CPU workload on both tracks, and one leaderboard.

The suite is a directory of ``bench train`` runs, one per (track, workload) --
``SUITE/defaults/digits-mlp``, ``SUITE/tuned/charlm``, ... -- each an ordinary run directory that
``guided-descent report`` renders on its own, plus the suite's ``summary.json`` with the
leaderboard (:mod:`guided_descent.experiments.bench.leaderboard`) and its verdicts.

* **Tracks** (BENCHMARKS.md rule 5): ``defaults`` runs every optimizer at its defaults;
  ``tuned`` gives every optimizer -- ours and, with ``--peers``, other libraries' -- the same
  learning-rate multipliers (``--sweep-factors``) on seed 0 and keeps, for the other seeds, the
  one whose run ended with the lowest validation loss (rule 9). Schedules, seeds, data order,
  EMA and clock are those of ``bench train`` for everyone.
* **Resumable** per (workload, optimizer, seed, learning-rate factor): every sub-run is recorded
  before any starts, and ``guided-descent run --resume SUITE`` finishes what is missing without
  training a finished run twice. The tuned track starts from the defaults track's runs at
  factor 1 (the same computation), so those are not trained twice either.
* **Budget** on 2 CPU cores, estimated from measured per-workload times (docs/leaderboard.md
  gives the arithmetic): ``--quick`` (the CI-sized variant of every workload, 3 seeds,
  multipliers 0.316/1/3.16, AdamW's final loss as the target) about a minute (measured: 36 s on
  one thread of a shared machine); the full suite (3 seeds, multipliers 0.1/0.316/1/3.16/10)
  105 minutes measured with ``--threads 1 --jobs 2`` -- see :data:`BUDGET`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from guided_descent.experiments import bench_train
from guided_descent.experiments.bench import leaderboard as lb
from guided_descent.experiments.bench.claims import min_seeds
from guided_descent.experiments.bench.workloads import WORKLOADS
from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    SUMMARY,
    RunDir,
    read_json,
    read_metrics,
    write_atomic,
)
from guided_descent.optimizers.registry import unknown_name

RESUMABLE = True
CPU_WORKLOADS: tuple[str, ...] = (
    "kron-quadratic", "digits-mlp", "digits-cnn", "digits-autoencoder", "mnist1d-mlp",
    "mnist1d-cnn", "mnist1d-gru", "mnist1d-transformer", "charlm",
)
TRACKS: tuple[str, ...] = ("defaults", "tuned")
FULL_FACTORS: tuple[float, ...] = (0.1, 0.316, 1.0, 3.16, 10.0)
QUICK_FACTORS: tuple[float, ...] = (0.316, 1.0, 3.16)
# The stated budget on 2 CPU cores, in minutes, both measured end to end: the quick suite on one
# thread, the full one with --threads 1 --jobs 2 (docs/leaderboard.md, "Budget").
BUDGET = {"quick": 1, "full": 105}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Every CPU workload on the defaults and the tuned track; one leaderboard across them."""

    optimizers: tuple[str, ...] = option(
        ("auto",), "optimizers per workload (auto: each workload's own list; AdamW always)"
    )
    workloads: tuple[str, ...] = option(CPU_WORKLOADS, "the bench train workloads to run")
    tracks: tuple[str, ...] = option(TRACKS, "defaults (no search) and/or tuned (lr multipliers)")
    seeds: int = option(3, "seeds 0..N-1 per workload and optimizer (rule 4: >= 3 on CPU)")
    steps: int = option(1, "not used: each workload has its own step budget")
    sweep_factors: tuple[float, ...] = option(
        FULL_FACTORS, "the tuned track's learning-rate multipliers, the same for every optimizer"
    )
    peers: bool = option(False, "also run every installed peer (other libraries' optimizers)")
    target: str = option("protocol", "the target of every workload: protocol (BENCHMARKS.md), "
                         "adamw (AdamW's final validation loss in the same run)")
    ci: bool = option(False, "the CI-sized variant of every workload (--quick sets it)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    jobs: int = option(1, "workloads trained at once, each in a process of its own (its two "
                       "tracks in order); timings then share the machine with the other jobs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.workloads:
            raise ValueError("workloads must name at least one workload")
        for name in self.workloads:
            if name not in WORKLOADS:
                raise unknown_name("workload", name, WORKLOADS)
        if len(set(self.workloads)) != len(self.workloads):
            raise ValueError(f"workloads lists a name twice: {','.join(self.workloads)}")
        if not self.tracks or any(t not in TRACKS for t in self.tracks):
            raise ValueError(f"tracks must be among {TRACKS}, got {self.tracks!r}")
        if self.target not in ("protocol", "adamw"):
            raise ValueError(f"target must be protocol or adamw, got {self.target!r}")
        if self.steps != 1:
            raise ValueError("bench suite takes each workload's own budget; --steps is not used")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.jobs > 1 and self.device != "cpu":
            raise ValueError(f"jobs > 1 shares one device between processes; it is for cpu, "
                             f"got --jobs {self.jobs} with device {self.device!r}")
        for workload in self.workloads:  # every sub-run's configuration must be valid up front
            for track in self.tracks:
                self.train_config(workload, track)

    @classmethod
    def quick(cls) -> Self:
        """Every workload's CI-sized variant, 3 seeds, multipliers 0.316/1/3.16: minutes.

        The protocol's targets belong to the full-size workloads and the small variants reach few
        of them, so the quick suite times "AdamW's final validation loss" instead."""
        return cls(ci=True, sweep_factors=QUICK_FACTORS, target="adamw")

    def train_config(self, workload: str, track: str) -> bench_train.Config:
        """The ``bench train`` configuration of one sub-run."""
        return bench_train.Config(
            task=workload, optimizers=self.optimizers, peers=self.peers, seeds=self.seeds,
            lr_sweep=track == "tuned", sweep_factors=self.sweep_factors, ci=self.ci,
            target=self.target,
            warmup_steps=3 if self.ci else 10, device=self.device,
        )


def sub_run(root: Path, track: str, workload: str) -> Path:
    return Path(root) / track / workload


def _copy_factor_one(defaults: RunDir, tuned: RunDir) -> int:
    """Give the tuned sub-run the defaults track's finished runs at factor 1 (the identical
    computation: same seeds, schedule and clock), with their evaluations; returns how many."""
    records = read_metrics(defaults.path)
    done = {(r["optimizer"], r["seed"]) for r in records
            if r.get("event") == "run" and r.get("lr_factor") == 1.0}
    have = {(r["optimizer"], r["seed"], r["lr_factor"]) for r in read_metrics(tuned.path)
            if r.get("event") == "run"}
    units = {(o, s, 1.0) for o, s in done} - have

    def unit(r: dict[str, Any]) -> tuple:
        return (r.get("optimizer"), r.get("seed"), r.get("lr_factor"))

    wanted = [r for r in records if unit(r) in units]
    if wanted:
        # A unit the tuned run had started itself and not finished: its partial records go.
        tuned.keep_metrics(lambda r: unit(r) not in units)
        with tuned.metrics() as metrics:
            for r in wanted:
                metrics.write(**r)
    return sum(r.get("event") == "run" for r in wanted)


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Prepare every sub-run, train what is not finished, then write the leaderboard."""
    from guided_descent.experiments import prepare

    started = time.perf_counter()
    subs: dict[tuple[str, str], RunDir] = {}
    for track in config.tracks:
        for workload in config.workloads:
            path = sub_run(run.path, track, workload)
            if (path / CONFIG).is_file():
                subs[track, workload] = RunDir.open(path)
            else:
                sub = RunDir.create(path)
                prepare("bench_train", config.train_config(workload, track), sub)
                _inherit_command(run, sub, track, workload)
                subs[track, workload] = sub
    if config.jobs > 1:
        reused = _train_in_parallel(run.path, config, subs, progress)
    else:
        reused = sum(_train_workload(subs, workload, progress)
                     for workload in config.workloads)
    summaries = {key: read_json(sub.path / SUMMARY) for key, sub in subs.items()}
    results, claims = leaderboard(config, summaries, read_json(run.file(ENV)))
    results["wall_seconds"] = time.perf_counter() - started
    results["reused_runs"] = reused
    results["jobs"] = config.jobs
    run.write_summary(results, claims)


def leaderboard(config: Config, summaries: dict[tuple[str, str], dict[str, Any]],
                env: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """The suite's results and its verdicts across workloads, from the sub-runs' summaries."""
    results = suite_results(config, summaries, env)
    claims = [lb.verdict(name, track, agg, min_seeds(config.device))
              for track, board in results["tracks"].items()
              for name, agg in board["aggregate"].items()]
    return results, claims


def rederive(root: Path) -> dict[str, Any]:
    """A finished suite's summary computed afresh from its sub-runs' files with this version's
    leaderboard code (what ``guided-descent report`` shows), keeping what only the run itself
    knew (wall time, reused runs, jobs). The stored ``summary.json`` is left as it was."""
    root = Path(root)
    stored = read_json(root / SUMMARY)
    config = Config.from_dict(read_json(root / CONFIG).get("config", {}))
    summaries = {(t, w): read_json(sub_run(root, t, w) / SUMMARY)
                 for t in config.tracks for w in config.workloads
                 if (sub_run(root, t, w) / SUMMARY).is_file()}
    results, claims = leaderboard(config, summaries, read_json(root / ENV))
    for key in ("wall_seconds", "reused_runs", "jobs"):
        if key in stored.get("results", {}):
            results[key] = stored["results"][key]
    return {**stored, "results": results, "claims": [c.to_dict() for c in claims]}


def _train_workload(subs: dict[tuple[str, str], RunDir], workload: str,
                    progress: Progress) -> int:
    """Train one workload's unfinished sub-runs, defaults track first (the tuned track takes its
    factor-1 runs from it); returns how many runs were taken instead of trained."""
    from guided_descent.experiments import resume

    reused = 0
    for track in TRACKS:
        sub = subs.get((track, workload))
        if sub is None or sub.finished:
            continue
        if track == "tuned" and ("defaults", workload) in subs:
            reused += _copy_factor_one(subs["defaults", workload], sub)
        if progress.enabled:
            print(f"bench suite: {track} track, {workload} -> {sub.path}",
                  file=progress.stream or sys.stderr)
        resume(sub, progress)
    return reused


# Measured seconds per run, training clock, one thread (docs/leaderboard.md, "Budget"): --jobs
# starts the costliest workloads (seconds per run x optimizers) first.
RUN_SECONDS = {
    "kron-quadratic": 3.0, "digits-mlp": 1.0, "digits-cnn": 3.0, "digits-autoencoder": 6.0,
    "mnist1d-mlp": 2.0, "mnist1d-cnn": 10.0, "mnist1d-gru": 16.0, "mnist1d-transformer": 19.0,
    "charlm": 114.0,
}


def _cost(config: Config, workload: str) -> float:
    """A workload's relative cost: seconds per run times its optimizers."""
    names = WORKLOADS[workload].optimizers if config.optimizers == ("auto",) else config.optimizers
    return RUN_SECONDS.get(workload, 0.0) * len(names)


def _worker(root: str, tracks: tuple[str, ...], workload: str, threads: int) -> int:
    """One --jobs process: one workload's sub-runs, without progress bars (they would interleave
    with the other jobs'); the suite prints a line as each workload ends."""
    import torch

    torch.set_num_threads(threads)
    subs = {(track, workload): RunDir.open(sub_run(Path(root), track, workload))
            for track in tracks}
    return _train_workload(subs, workload, Progress(enabled=False))


def _train_in_parallel(root: Path, config: Config, subs: dict[tuple[str, str], RunDir],
                       progress: Progress) -> int:
    """Train the workloads ``config.jobs`` at a time, each in a spawned process with this
    process's torch thread count, the costliest first; returns the runs reused.

    Every sub-run is its own directory and a workload's two tracks stay in one process, so no two
    processes write one file. A failure stops the suite after the jobs already running end; what
    finished is kept for ``run --resume``."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    todo = [w for w in config.workloads
            if any(not subs[t, w].finished for t in config.tracks)]
    todo.sort(key=lambda w: -_cost(config, w))
    threads = torch.get_num_threads()
    stream = progress.stream or sys.stderr
    reused = 0
    context = multiprocessing.get_context("spawn")  # no forked copy of a threaded torch
    with ProcessPoolExecutor(max_workers=config.jobs, mp_context=context) as pool:
        futures = {pool.submit(_worker, str(root), config.tracks, w, threads): w for w in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                reused += future.result()
                if progress.enabled:
                    print(f"bench suite: {futures[future]} done "
                          f"({len(futures) - len(pending)}/{len(futures)} workloads)",
                          file=stream)
    return reused


def _inherit_command(run: RunDir, sub: RunDir, track: str, workload: str) -> None:
    """Record in the sub-run's env.json the suite command that made it."""
    env = read_json(sub.file(ENV))
    suite = read_json(run.file(ENV)).get("command")
    if suite:
        env["command"] = f"{suite}  # sub-run: {track} track, {workload}"
    write_atomic(sub.file(ENV), json.dumps(env, indent=2) + "\n")


def suite_results(config: Config, summaries: dict[tuple[str, str], dict[str, Any]],
                  env: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard of every track: per workload the ratio tables, across workloads the
    geometric means; plus each sub-run's claims, re-stated."""
    tracks: dict[str, Any] = {}
    for track in config.tracks:
        tables = {w: lb.workload_table(summaries[track, w]) for w in config.workloads
                  if (track, w) in summaries}
        tracks[track] = {
            "workloads": tables,
            "aggregate": lb.aggregate(tables),
            "targets": {w: summaries[track, w]["results"]["targets"]["primary"]
                        for w in tables},
            "claims": {w: summaries[track, w]["claims"] for w in tables},
            "lr_factors": {w: summaries[track, w]["results"]["lr_factors"] for w in tables},
        }
    return {
        "device": device_label(env, config.device),
        "workloads": list(config.workloads),
        "seeds": config.seeds,
        "ci": config.ci,
        "sweep_factors": list(config.sweep_factors),
        "min_seeds": min_seeds(config.device),
        "bootstrap": {"resamples": lb.RESAMPLES, "seed": lb.SEED,
                      "quantiles": [lb.LOW_Q, lb.HIGH_Q]},
        "tracks": tracks,
    }


def device_label(env: dict[str, Any], device: str) -> str:
    """The device a leaderboard belongs to: the GPU's name, or the CPU model and threads."""
    if device.startswith("cuda"):
        return env.get("device_name") or device
    cpu = env.get("cpu_model") or env.get("machine") or "CPU"
    return f"{cpu}, {env.get('torch_threads', '?')} torch threads"


__all__ = ["BUDGET", "CPU_WORKLOADS", "TRACKS", "Config", "leaderboard", "rederive", "run",
           "suite_results"]
