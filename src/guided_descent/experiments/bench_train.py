"""Benchmark: train real models to a target, every optimizer under the same protocol.

``guided-descent bench train --task TASK`` runs each optimizer on the task's model and data for
a step budget (optionally capped in wall-clock minutes), several seeds, and reports the final
validation metric, the steps, samples and seconds to a target, the optimizer's step time and
state memory, each with median and range over seeds and as a ratio to AdamW measured in the same
run. The workloads, targets and expected rankings are those of ``spec/BENCHMARKS.md``; the
summary's claims say PASS, FAIL or UNDECIDED (with the reason) whether every run stayed finite
and whether each expected ranking held beyond the seed spread.

This module holds the configuration (one frozen dataclass: the CLI flags, the help text and
``config.json``) and the run; the rest reads on its own, in ``experiments/bench/``:

* ``workloads.py`` -- the tasks: data, model, loss, evaluation, target, expected ranking;
* ``protocol.py`` -- one timed run (warm-up and restore, the clock, the schedule, evaluations);
* ``sweep.py`` -- the two tracks (defaults; ``--lr-sweep``) and resuming finished runs;
* ``results.py`` -- targets, time to target, statistics over seeds, ratios to AdamW;
* ``claims.py`` -- the verdicts: rule 4's paired seed test, rules 7-9.

**Same conditions for every optimizer** ("Measuring fairly" in BENCHMARKS.md): the registry's or
the peer library's defaults, or (``--lr-sweep``) the best of the same learning-rate multipliers
for everyone; one schedule family laid out over the whole budget; the EMA of the weights is what
is evaluated (``--ema-decay 0``: the raw weights); data order and initial weights fixed by the
seed; only training steps clocked, after untimed warm-up steps and a state restore; the
optimizers' per-step finiteness check off (a run whose loss turns non-finite stops and counts as
diverged). Time-to-target is the training time at the first evaluation that meets the target,
counted only when the run still meets it at the end of its schedule; a miss gets ``budget + 1``
steps and no time.

Targets: the task's protocol target (a fixed accuracy or loss, or AdamW's value at 80 % of the
budget), any further fixed target the task publishes beside it (charlm: 1.60 nats/byte beside the
CI target 1.90), and always also "AdamW's final validation loss". ``--target`` picks which one
the claims call primary, or sets a number.

Several processes (``--nproc N``, through ``torchrun``): data-parallel training with
``DistributedDataParallel`` (gloo on CPU, nccl on GPUs). Every minibatch is drawn as on one
process and each rank computes on its 1/N share, so the averaged gradient -- and the run -- is
the one-process run up to summation order; Muon, Shampoo, SOAP and K-FAC split their matrix work
over the ranks. Times are rank 0's; the logged minibatch loss is rank 0's share's.

GPU path: ``--device cuda`` runs the model under bfloat16 autocast (``--precision``) while
parameters and optimizer state stay float32; ``--compile`` compiles the model with
``torch.compile`` (and lets heavyball compile its steps).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import torch

import guided_descent as gd
from guided_descent.experiments import peers as peer_lib
from guided_descent.experiments.bench.claims import (
    BASELINE,
    Z_SPREAD,
    claims,
    clears_spread,
    peer_claims,
    ranking_claims,
)
from guided_descent.experiments.bench.protocol import (
    StepClock,
    build_optimizer,
    make_schedule,
    run_one,
)
from guided_descent.experiments.bench.results import (
    TARGET_CHOICES,
    meets,
    resolve_targets,
    summarize,
    time_to_target,
    value_at_fraction,
)
from guided_descent.experiments.bench.sweep import finished_runs, run_all
from guided_descent.experiments.bench.workloads import WORKLOADS, Problem, Ranking, Workload
from guided_descent.experiments.config import (
    ExperimentConfig,
    check_hyper,
    option,
    parse_overrides,
)
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import ENV, RunDir, read_json, write_json
from guided_descent.optimizers.registry import unknown_name

# Runs under torchrun (`--nproc N`): data-parallel training, see the module docstring.
MULTI_PROCESS = True
# `guided-descent run --resume` continues from the finished (optimizer, seed, lr factor) runs.
RESUMABLE = True
AUTO = "auto"
SCHEDULES = ("cosine", "constant", "wsd")
PRECISIONS = ("auto", "fp32", "bf16")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Train a task's model to a target with each optimizer; steps, time and memory vs AdamW."""

    task: str = option("digits-mlp", "workload: " + ", ".join(WORKLOADS))
    optimizers: tuple[str, ...] = option(
        (AUTO,), "registry or peer names (auto: the task's list); AdamW is always added as the "
        "baseline; peers: " + ", ".join(peer_lib.PEERS)
    )
    peers: bool = option(False, "also run every installed peer (other libraries' optimizers)")
    hyper: tuple[str, ...] = option(
        (), "override a hyper-parameter of one of ours: NAME.KEY=VALUE, comma-separated "
        "(e.g. muon.ns_dtype=bfloat16,soap.precondition_frequency=20); VALUE is a number, "
        "true/false/none, a torch dtype name or a word"
    )
    seeds: int = option(3, "seeds 0..N-1 (data order and initial weights)")
    steps: int = option(1, "not used by bench train: the budget is --budget-steps")
    budget_steps: int = option(0, "optimizer steps per run (0: the task's default)")
    budget_minutes: float = option(0.0, "also stop a run after this much training time "
                                   "(minutes, clocked steps only; 0: no cap)")
    batch_size: int = option(0, "minibatch size (0: the task's default)")
    eval_every: int = option(0, "evaluate every N steps (0: the task's default)")
    warmup_steps: int = option(10, "untimed steps before each timed run, then state restored")
    schedule: str = option("cosine", "LR schedule for all: cosine (warm-up 5 % from 0.1x, "
                           "cosine to 0.1x), constant (warm-up, then flat) or wsd (warm-up, "
                           "flat, 1-sqrt cool-down over the last 20 %)")
    lr_warmup: float = option(0.05, "fraction of the budget spent in the LR warm-up")
    ema_decay: float = option(0.999, "evaluate an EMA of the weights with this decay "
                              "(with warm-up); 0: evaluate the raw weights")
    clip: float = option(-1.0, "clip the global gradient norm to this (0: off; -1: the task's "
                         "default, 1.0 for charlm, off otherwise)")
    lr_sweep: bool = option(False, "tune: try each optimizer at every --sweep-factors "
                            "multiple of its learning rates on seed 0, keep the best")
    sweep_factors: tuple[float, ...] = option((0.316, 1.0, 3.16),
                                              "learning-rate multipliers of --lr-sweep")
    target: str = option("protocol", "what the ranking claims use: protocol (BENCHMARKS.md), "
                         "adamw (AdamW's final validation loss), or a number on the task's "
                         "metric")
    ci: bool = option(False, "the task's CI-sized variant (smaller model/data, short budget)")
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; "
                            "parameters and optimizer state stay float32")
    compile: bool = option(False, "torch.compile the model (and heavyball's optimizer steps)")
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in WORKLOADS:
            raise unknown_name("task", self.task, WORKLOADS)
        if self.steps != 1:
            raise ValueError("bench train sets its budget with --budget-steps, not --steps")
        specs = gd.optimizers()
        workload = WORKLOADS[self.task]
        for name in self.optimizers:
            if name == AUTO or peer_lib.is_peer(name):
                continue
            if name not in specs:
                raise unknown_name("optimizer", name, [*specs, *peer_lib.PEERS])
            if name == "natural_gradient" and workload.ng_loss is None:
                raise ValueError(f"natural_gradient cannot run on {self.task} (no supported "
                                 "loss for its Gauss-Newton products)")
            if specs[name].needs_model and self.compile:
                raise ValueError(f"{name} hooks into the model's layers; it cannot run with "
                                 "--compile")
        overrides = self.overrides()  # parses, and names the bad entry
        for name, kwargs in overrides.items():
            if name not in specs:
                raise ValueError(f"hyper: {name!r} is not one of our optimizers (peers run at "
                                 "their library's defaults)")
            if name not in self.names():
                raise ValueError(f"hyper: {name} is not among the optimizers of this run")
            required = {"loss": workload.ng_loss} if name == "natural_gradient" else {}
            check_hyper(name, {**required, **kwargs})
        if AUTO in self.optimizers and len(self.optimizers) > 1:
            raise ValueError("optimizers: 'auto' cannot be combined with other names")
        for name in ("budget_steps", "batch_size", "eval_every", "warmup_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.budget_minutes, (int, float)) and self.budget_minutes >= 0
                and math.isfinite(self.budget_minutes)):
            raise ValueError(f"budget_minutes must be a number >= 0, got {self.budget_minutes!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.lr_warmup < 1.0:
            raise ValueError(f"lr_warmup must be in [0, 1), got {self.lr_warmup!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (self.clip == -1.0 or 0.0 <= self.clip < math.inf):
            raise ValueError(f"clip must be -1, 0 or a positive number, got {self.clip!r}")
        if not self.sweep_factors or not all(f > 0 and math.isfinite(f)
                                             for f in self.sweep_factors):
            raise ValueError(f"sweep_factors must be positive numbers, got {self.sweep_factors!r}")
        if self.target not in TARGET_CHOICES:
            try:
                value = float(self.target)
            except ValueError:
                raise ValueError(f"target must be one of {TARGET_CHOICES} or a number, got "
                                 f"{self.target!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"target must be finite, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def quick(cls) -> Self:
        """The task's CI-sized variant, 2 seeds, 3 warm-up steps: seconds on 2 cores."""
        return cls(ci=True, seeds=2, warmup_steps=3)

    def overrides(self) -> dict[str, dict[str, Any]]:
        """``--hyper`` as {optimizer: {key: value}}."""
        return parse_overrides(self.hyper)

    def check_world_size(self, world: int) -> None:
        """Refuse what cannot run data-parallel on ``world`` processes (before any launch)."""
        if world == 1:
            return
        if self.batch % world:
            raise ValueError(f"batch_size {self.batch} does not split evenly over {world} "
                             "processes: pick a multiple of --nproc")
        if "natural_gradient" in self.names():
            raise ValueError("natural_gradient does not run under DistributedDataParallel "
                             "(docs/distributed.md); leave it out with --nproc > 1")

    # Resolved settings ------------------------------------------------------------------------

    @property
    def workload(self) -> Workload:
        return WORKLOADS[self.task]

    def _ci(self, key: str, default: Any) -> Any:
        return self.workload.ci.get(key, default) if self.ci else default

    @property
    def budget(self) -> int:
        return self.budget_steps or self._ci("steps", self.workload.steps)

    @property
    def batch(self) -> int:
        return self.batch_size or self._ci("batch_size", self.workload.batch_size)

    @property
    def cadence(self) -> int:
        return min(self.eval_every or self._ci("eval_every", self.workload.eval_every),
                   self.budget)

    @property
    def clip_norm(self) -> float | None:
        if self.clip == -1.0:
            return self.workload.clip
        return self.clip or None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.precision == "bf16" or (
            self.precision == "auto" and torch.device(self.device).type == "cuda"
        ):
            return torch.bfloat16
        return None

    def names(self) -> list[str]:
        """The optimizers to run, AdamW (the baseline) first, peers last."""
        listed = (self._ci("optimizers", self.workload.optimizers)
                  if self.optimizers == (AUTO,) else self.optimizers)
        names = [BASELINE, *(n for n in listed if n != BASELINE)]
        if self.peers:
            names += [p for p in peer_lib.PEERS if p not in names]
        return names


def _environment_extras(config: Config) -> dict[str, Any]:
    extras: dict[str, Any] = {"peers": peer_lib.versions(),
                              "mnist1d": peer_lib.version("mnist1d")}
    if config.task.startswith("charlm"):
        from guided_descent.tasks import charlm

        extras["corpus"] = charlm.CORPUS
        extras["corpus_sha256"] = charlm.CORPUS_SHA256
    return extras


def _record_environment(run: RunDir, extras: dict[str, Any]) -> None:
    """Add peer versions and the corpus hash to ``env.json`` (written before ``run`` starts)."""
    path = run.file(ENV)
    env = read_json(path) if path.exists() else {}
    env.setdefault("packages", {}).update({"mnist1d": extras["mnist1d"], **extras["peers"]})
    for key in ("corpus", "corpus_sha256"):
        if key in extras:
            env[key] = extras[key]
    write_json(path, env)


@contextlib.contextmanager
def _quiet_peer_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # heavyball warns once that a changing learning rate (our schedule) is "experimental";
        # it is supported with multi_tensor=True, its default.
        warnings.filterwarnings("ignore", message="Learning rate changed between steps")
        yield


def run(config: Config, run: RunDir, progress: Progress) -> None:
    from guided_descent import distributed as gdd

    with gdd.process_group_from_env(config.device) as proc:
        _run(config, run, progress, proc)


def _run(config: Config, run: RunDir, progress: Progress, proc: Any) -> None:
    device = proc.device
    world = proc.world_size
    w = config.workload
    config.check_world_size(world)
    extras = _environment_extras(config)
    _record_environment(run, extras)
    names, skipped = [], {}
    for name in config.names():
        reason = peer_lib.availability(name) if peer_lib.is_peer(name) else None
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    budget = config.budget
    shard = (proc.rank, world)
    problems = {seed: w.build(seed, budget, config.batch, config.ci, device, shard)
                for seed in range(config.seeds)}
    # Resuming (one process only: under torchrun every rank must train every unit again).
    done = finished_runs(run) if world == 1 else {}
    factors = tuple(config.sweep_factors) if config.lr_sweep else (1.0,)
    sweep: dict[str, dict[str, float | None]] = {}
    total_runs = len(names) * (config.seeds + (len(factors) - 1 if config.lr_sweep else 0))
    started = time.perf_counter()
    with run.metrics() as metrics, progress.bar(total_runs, f"bench train {config.task}",
                                                unit="run") as bar, \
            peer_lib.heavyball_compile(config.compile), _quiet_peer_warnings():

        def failed(name: str, e: Exception) -> bool:
            # Another library's failure must not end a long benchmark: note it and go on.
            # Ours must: it is a bug to fix.
            if not peer_lib.is_peer(name):
                return False
            skipped[name] = f"failed: {type(e).__name__}: {e}".splitlines()[0]
            return True

        runs, chosen, tried = run_all(config, problems, names, factors, metrics, bar, device,
                                      done, failed)
        if config.lr_sweep:
            sweep = tried
    wall = time.perf_counter() - started
    if BASELINE not in runs:
        raise RuntimeError("the AdamW baseline did not run; nothing to compare against")
    results = summarize(config, runs, problems[0].samples_per_step)
    results.update(
        task=config.task,
        workload={"summary": w.summary, "metric": w.metric, "maximize": w.maximize,
                  "loss_metric": w.loss_metric, "expected": w.expected,
                  "rankings": [r.text for r in w.rankings]},
        budget_steps=budget,
        budget_minutes=config.budget_minutes,
        batch_size=config.batch,
        eval_every=config.cadence,
        samples_per_step=problems[0].samples_per_step,
        world_size=world,
        clip=config.clip_norm,
        autocast=str(config.autocast_dtype).replace("torch.", "") if config.autocast_dtype
        else None,
        problem=problems[0].info,
        skipped=skipped,
        peers={n: {"package": peer_lib.PEERS[n].package,
                   "version": peer_lib.version(peer_lib.PEERS[n].package),
                   "class": peer_lib.PEERS[n].qualname,
                   "counterpart": peer_lib.PEERS[n].counterpart}
               for n in runs if peer_lib.is_peer(n)},
        lr_factors=chosen,
        overrides={n: {k: str(v).replace("torch.", "") for k, v in kw.items()}
                   for n, kw in config.overrides().items()},
        sweep=sweep,
        versions=extras,
        hyperparams={n: _hyperparams(n, problems[0], config) for n in runs},
        wall_seconds=wall,
    )
    run.write_summary(results, claims(config, results))


_SHOWN = ("lr", "momentum", "betas", "eps", "weight_decay", "nesterov")


def _hyperparams(name: str, problem: Problem, config: Config) -> list[dict[str, Any]]:
    """What each param group of ``name`` ran with (read from a throwaway instance)."""
    model = problem.model()
    try:
        built = build_optimizer(name, model, config)
    except peer_lib.PeerUnavailable:
        return []
    groups = []
    for g in built.optimizer.param_groups:
        entry = {k: g[k] for k in _SHOWN if k in g and isinstance(g[k], (int, float, tuple,
                                                                         bool))}
        entry["params"] = sum(p.numel() for p in g["params"])
        if "algorithm" in g:
            entry["algorithm"] = g["algorithm"]
        for key in config.overrides().get(name, {}):  # what --hyper changed, as the group has it
            if key in g and key not in entry:
                entry[key] = str(g[key]).replace("torch.", "")
        groups.append(entry)
    built.close()
    return groups


__all__ = [
    "BASELINE",
    "WORKLOADS",
    "Z_SPREAD",
    "Config",
    "Problem",
    "Ranking",
    "StepClock",
    "Workload",
    "build_optimizer",
    "claims",
    "clears_spread",
    "make_schedule",
    "meets",
    "peer_claims",
    "ranking_claims",
    "resolve_targets",
    "run",
    "run_one",
    "summarize",
    "time_to_target",
    "value_at_fraction",
]


