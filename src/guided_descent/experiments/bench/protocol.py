"""The timing protocol of ``bench train``: one optimizer trained on one seed, with the clock on.

:func:`run_one` is "Measuring fairly" 1-3 and 8 of BENCHMARKS.md in code:

* untimed warm-up steps (compilation, first preconditioner refresh, lazy state, allocator), then
  the model's initial weights loaded back, the optimizer built anew (its state is empty, so this
  restores it; K-FAC's hooks go with the old one) and the global RNG re-seeded where it was;
* only training steps are clocked (forward, backward, clipping, step, schedule, EMA), each
  bracketed by a device synchronisation; evaluations and logging are not;
* the optimizer step is clocked on its own through ``register_step_pre_hook``/``post_hook``;
* one schedule family for every optimizer (:func:`make_schedule`), laid out over the whole step
  budget, so every run ends on its own schedule's last step (unless ``--budget-minutes`` stops
  it first: the record says so). The exception is a schedule-free optimizer, whose average
  replaces the decay: it gets the same warm-up, then a constant rate, no weight EMA (its ``x``
  is already an average), and is evaluated at ``x`` (see :func:`~..training.train`) -- the way
  its authors run it; a cosine on top would count its decay twice;
* evaluation on a fixed cadence and after the last step; the record keeps every evaluation as
  ``curve`` (step, training seconds, metric, loss metric), from which targets are read.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import guided_descent as gd
from guided_descent.ema import EMA
from guided_descent.experiments import peers as peer_lib
from guided_descent.experiments.bench.workloads import Problem, stream_seed
from guided_descent.experiments.bench_step import state_bytes
from guided_descent.experiments.records import MetricsWriter
from guided_descent.experiments.training import evaluation_point, train
from guided_descent.optimizers.schedule_free import ScheduleFreeModes
from guided_descent.schedules import WSD, Constant, Cosine, LinearWarmup, Schedule, join

if TYPE_CHECKING:
    from guided_descent.experiments.bench_train import Config


def make_schedule(kind: str, steps: int, warmup_fraction: float) -> Schedule:
    """The schedule family every optimizer gets (see :class:`Config`'s ``schedule``)."""
    warm = min(round(warmup_fraction * steps), steps - 1) if steps > 1 else 0
    if kind == "wsd":
        cooldown = min(round(0.2 * steps), steps - warm)
        return WSD(steps, warmup=warm, cooldown=cooldown, shape="1-sqrt")
    rest: Schedule = Cosine(steps - warm, floor=0.1) if kind == "cosine" else Constant(steps - warm)
    # Start the warm-up at 0.1x rather than 0, so that the first step already moves the weights.
    return join(LinearWarmup(warm, start=0.1), rest) if warm else rest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Accumulates synchronised wall-clock time between ``start()`` and ``stop()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self.laps: list[float] = []
        self._t0: float | None = None

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            return
        _sync(self.device)
        lap = time.perf_counter() - self._t0
        self._t0 = None
        self.total += lap
        self.laps.append(lap)


class _OutOfTime(Exception):
    """Raised from the step callback when the wall-clock budget is spent."""


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    kind: str  # "registry" or "peer"
    note: str = ""

    def close(self) -> None:
        """Detach whatever the optimizer hooked into the model (K-FAC, natural gradient)."""
        remove = getattr(self.optimizer, "remove_hooks", None)
        if callable(remove):
            remove()


def build_optimizer(name: str, model: nn.Module, config: Config) -> BuiltOptimizer:
    """Registry optimizers at their defaults with the guard off; peers through their adapters.

    ``model`` may be a ``DistributedDataParallel`` module: ours then split their matrix work
    over the ranks; a peer gets the module inside (DDP still averages its gradients).
    """
    if peer_lib.is_peer(name):
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        built = peer_lib.create(name, inner)
        return BuiltOptimizer(built.optimizer, "peer", built.note)
    extra: dict[str, Any] = {}
    if name == "natural_gradient":
        extra["loss"] = config.workload.ng_loss
    extra.update(config.overrides().get(name, {}))
    return BuiltOptimizer(gd.create(name, model, on_nonfinite="off", **extra), "registry")


def total_state_bytes(opt: torch.optim.Optimizer) -> int:
    if isinstance(opt, peer_lib.Chain):
        return sum(total_state_bytes(p) for p in opt.parts)
    return state_bytes(opt)


def _autocast(config: Config) -> contextlib.AbstractContextManager[Any]:
    dtype = config.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _spent(seconds: float, world: int, device: torch.device) -> float:
    """The training time that counts against ``--budget-minutes``: the slowest rank's, so that
    every rank stops after the same step."""
    if world == 1:
        return seconds
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_one(
    config: Config, problem: Problem, name: str, seed: int, lr_factor: float,
    metrics: MetricsWriter, on_step: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Warm up, restore, then train ``name`` on ``problem`` with the clock running.

    Under an initialized process group of several ranks (``--nproc``) the model is wrapped in
    ``DistributedDataParallel``: ``problem`` then holds this rank's share of every batch.
    """
    device = torch.device(config.device) if device is None else device
    budget = config.budget
    global_seed = stream_seed(seed, "global")
    world = _world_size()
    model = problem.model().to(device)
    initial = copy.deepcopy(model.state_dict())
    trained: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    forward: nn.Module = torch.compile(trained) if config.compile else trained  # type: ignore[assignment]
    # Evaluation runs on the plain module (each rank evaluates the same weights).
    if trained is model:
        scorer = forward
    else:
        scorer = torch.compile(model) if config.compile else model  # type: ignore[assignment]

    def step_loss(step: int) -> Tensor:
        with _autocast(config):
            return problem.batch_loss(forward, step)

    # Warm-up: compile, first preconditioner refresh, lazy state and allocator, all untimed.
    torch.manual_seed(global_seed)
    warm = build_optimizer(name, trained, config)
    for step in range(1, min(config.warmup_steps, budget) + 1):
        loss = step_loss(step)
        warm.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        warm.optimizer.step()
    _sync(device)
    schedule_free = isinstance(warm.optimizer, ScheduleFreeModes)
    warm.close()
    del warm
    # Restore: initial weights, a fresh optimizer (empty state), the RNG where it started.
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(global_seed)
    # The EMA copies the model before the optimizer can attach hooks to it (K-FAC).
    ema = EMA(model, decay=config.ema_decay) if config.ema_decay > 0 and not schedule_free else None
    built = build_optimizer(name, trained, config)
    opt = built.optimizer
    for group in opt.param_groups:
        group["lr"] *= lr_factor  # before the scheduler records the initial rates

    clock, opt_clock = StepClock(device), StepClock(device)
    opt.register_step_pre_hook(lambda *_: opt_clock.start())
    opt.register_step_post_hook(lambda *_: opt_clock.stop())
    deadline = 60.0 * config.budget_minutes if config.budget_minutes > 0 else math.inf
    done = 0
    history: list[tuple[int, float, dict[str, float]]] = []

    def evaluate() -> dict[str, float]:
        model.eval()
        try:
            with _autocast(config):
                scores = problem.evaluate(scorer)
        finally:
            model.train()
        history.append((done, clock.total, dict(scores)))
        return {**scores, "train_seconds": clock.total, "samples": done * problem.samples_per_step}

    def batch_loss(step: int) -> Tensor:
        clock.start()
        return step_loss(step)

    def after_step(step: int) -> None:
        nonlocal done
        clock.stop()
        done = step
        if on_step is not None:
            on_step(step)
        if deadline < math.inf and step < budget and _spent(clock.total, world, device) >= deadline:
            raise _OutOfTime

    tags = {"optimizer": name, "seed": seed, "lr_factor": lr_factor}
    stopped_by_clock = False
    diverged = False
    try:
        result = train(
            model, opt, batch_loss, budget,
            schedule=make_schedule(
                "constant" if schedule_free else config.schedule, budget, config.lr_warmup
            ),
            ema=ema, clip_grad_norm=config.clip_norm, evaluate=evaluate,
            eval_every=config.cadence, metrics=metrics, tags=tags, on_step=after_step,
            # Each rank logs the loss of its own share: the ranks could disagree on stopping.
            stop_on_nonfinite=world == 1,
        )
        diverged = result.diverged
    except _OutOfTime:
        # train() stops at the exception without its final evaluation; make it here, logged in
        # the same format, so the run ends on an evaluation like every other.
        stopped_by_clock = True
        swap = ema.swapped() if ema is not None else contextlib.nullcontext()
        with evaluation_point(opt), swap:
            scores = evaluate()
        metrics.write(event="eval", **tags, step=done, batch_loss=None, **scores)
    final = history[-1][2]
    finite = (not diverged and _params_finite(model)
              and all(math.isfinite(v) for v in final.values()))
    opt_laps = opt_clock.laps
    record = {
        **tags,
        "kind": built.kind,
        "note": built.note,
        "steps_done": done,
        "stopped_by_clock": stopped_by_clock,
        "diverged": diverged,
        "finite": finite,
        "train_seconds": clock.total,
        "step_ms": 1e3 * statistics.median(clock.laps) if clock.laps else None,
        "opt_step_ms": 1e3 * statistics.median(opt_laps) if opt_laps else None,
        "opt_seconds": opt_clock.total,
        "state_bytes": total_state_bytes(opt),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final": final,
        # (step, train seconds, the two metrics) at every evaluation: what targets are read from
        "curve": [(s, t, sc.get(config.workload.metric), sc.get(config.workload.loss_metric))
                  for s, t, sc in history],
    }
    # The curve goes into the record too: a resumed run rebuilds its tables from these records.
    metrics.write(event="run", **record)
    built.close()
    return record
