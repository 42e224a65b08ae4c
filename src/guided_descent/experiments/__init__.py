"""Experiments: one module each, a frozen ``Config`` plus ``run(config, run, progress)``.

An experiment module provides

* ``Config`` -- a frozen dataclass derived from :class:`ExperimentConfig` (its fields are the CLI
  flags and the saved ``config.json``), with ``Config.quick()`` for ``--quick``;
* ``run(config, run, progress)`` -- trains, appends to ``metrics.jsonl``, stores what the report
  needs, and writes ``summary.json`` with claims computed from the results.

Tables and figures are drawn by ``guided_descent.report`` from the run's files alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from guided_descent.experiments.config import ExperimentConfig
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import CONFIG, RunDir, read_json
from guided_descent.optimizers.registry import unknown_name


@dataclass(frozen=True)
class ExperimentInfo:
    name: str
    module: str
    summary: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


EXPERIMENTS: dict[str, ExperimentInfo] = {
    e.name: e
    for e in (
        ExperimentInfo(
            "moons",
            "guided_descent.experiments.moons",
            "six optimizers x widths 32 / 8192 on two moons: the lecture's table and boundaries",
        ),
        ExperimentInfo(
            "quadratic",
            "guided_descent.experiments.quadratic",
            "iterations to 1e-6 vs condition number: GD ~ kappa, momentum ~ sqrt(kappa), Newton 1",
        ),
        ExperimentInfo(
            "linear-representation",
            "guided_descent.experiments.linear_representation",
            "subspace distance vs step under ill-conditioned inputs: SGD, Adam, layer-wise "
            "preconditioning, Gauss-Newton, K-FAC/Shampoo/SOAP/Muon",
        ),
        ExperimentInfo(
            "single-index",
            "guided_descent.experiments.single_index",
            "one feature-learning step, anisotropic inputs: SGD's spike stuck at cos(Sigma b, b), "
            "layer-wise preconditioning aligned",
        ),
        ExperimentInfo(
            "mup",
            "guided_descent.experiments.mup",
            "SP vs muP across widths 64..1024: coordinate check (Adam, Muon, GPT) and LR transfer",
        ),
    )
}

# What `guided-descent run` runs when no experiment is named, and with which configuration:
# "default" is the experiment's own (its quick one under --quick); another name is a preset
# classmethod of its Config, used with and without --quick. The lecture's two experiments,
# then the paper's "when AdamW is not enough" comparison at a size that takes seconds.
FLAGSHIP: dict[str, str] = {
    "moons": "default",
    "quadratic": "default",
    "linear-representation": "flagship",
}

# `guided-descent bench KIND`: measurements of the library itself, recorded like experiments.
BENCHMARKS: dict[str, ExperimentInfo] = {
    "step": ExperimentInfo(
        "bench_step",
        "guided_descent.experiments.bench_step",
        "time optimizer.step() and state memory on GPT-2-small shapes, vs fused AdamW",
    ),
    "train": ExperimentInfo(
        "bench_train",
        "guided_descent.experiments.bench_train",
        "train a task's model to a target: steps, seconds and memory per optimizer vs AdamW",
    ),
    "suite": ExperimentInfo(
        "bench_suite",
        "guided_descent.experiments.bench_suite",
        "every CPU workload on both tracks (defaults, tuned): one leaderboard vs AdamW",
    ),
}


def get_experiment(name: str) -> ExperimentInfo:
    """An experiment by name, or a benchmark by its record name (``bench_step``)."""
    known = {**EXPERIMENTS, **{b.name: b for b in BENCHMARKS.values()}}
    if name not in known:
        raise unknown_name("experiment", name, EXPERIMENTS)
    return known[name]


def resume(run: RunDir, progress: Progress) -> str:
    """Run a prepared or interrupted run with its recorded configuration; return its name.

    Experiments that declare ``RESUMABLE = True`` skip the units of work they finished before
    (same results as an uninterrupted run); the others start again from the beginning, their
    partial records replaced.
    """
    saved = read_json(run.file(CONFIG))
    name = saved.get("experiment")
    module = get_experiment(name).load()
    config = module.Config.from_dict(saved.get("config", {}))
    if not getattr(module, "RESUMABLE", False):
        run.keep_metrics(lambda record: False)
    module.run(config, run, progress)
    return name


def prepare(name: str, config: ExperimentConfig, run: RunDir) -> None:
    """Record ``config.json`` and ``env.json``: after this, :func:`resume` can run it."""
    module = get_experiment(name).load()
    if not isinstance(config, module.Config):
        raise TypeError(f"{name} expects a {module.Config.__name__}, got {type(config).__name__}")
    run.write_config(name, config)
    run.write_env(config.device)


def execute(name: str, config: ExperimentConfig, run: RunDir, progress: Progress) -> None:
    """Record ``config.json`` and ``env.json``, then run experiment ``name`` into ``run``."""
    prepare(name, config, run)
    get_experiment(name).load().run(config, run, progress)


__all__ = [
    "BENCHMARKS",
    "EXPERIMENTS",
    "FLAGSHIP",
    "ExperimentConfig",
    "ExperimentInfo",
    "Progress",
    "RunDir",
    "execute",
    "get_experiment",
    "prepare",
    "resume",
]
