"""One small training loop that experiments share: optimizer, schedule, EMA, clipping, evaluation.

Each step of :func:`train`::

    loss = batch_loss(step)                        # the caller's forward on step's minibatch
    optimizer.zero_grad(set_to_none=True); loss.backward()
    clip_grad_norm_(params, clip)                  # if clip is set
    optimizer.step()
    scheduler.step()                               # if a schedule is set (LambdaLR)
    ema.update()                                   # if an EMA is set
    every eval_every steps and after the last:     # evaluate (with the EMA's weights swapped
        evaluate() -> scores; metrics.write(...)   # in when there is one) and log

Step 0 (before any update) is evaluated and logged too, so every curve starts at the
initialisation. Minibatch losses are summed on the device and read only at evaluations (a read
every step would force a device sync). ``metrics.jsonl`` receives one ``event="eval"`` record
per evaluation: the caller's tags, ``step``, ``batch_loss`` (the mean minibatch loss since the
previous evaluation; ``None`` at step 0), the learning rate of each param group when a schedule
is set, the optimizer's diagnostics summary (skipped steps, largest update RMS and condition
number, oldest preconditioner, failures; see ``optimizers.diagnostics.summarize``) when it has
``diagnostics()``, and the scores.

The loop does not own data or models: the caller's ``batch_loss(step)`` decides the batch order,
so seeds and pairing stay the experiment's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from guided_descent.ema import EMA
from guided_descent.experiments.records import MetricsWriter
from guided_descent.optimizers.diagnostics import summarize
from guided_descent.optimizers.schedule_free import ScheduleFreeModes
from guided_descent.schedules import Schedule, scheduler


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``scores``: the last evaluation's scores (``{}`` without ``evaluate``); ``steps``: optimizer
    steps taken; ``diverged``: stopped early because the minibatch loss was not finite
    (checked at evaluations, when ``stop_on_nonfinite``); ``history``: every evaluation as
    ``(step, batch_loss, scores)``.
    """

    scores: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    diverged: bool = False
    history: list[tuple[int, float | None, dict[str, float]]] = field(default_factory=list)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train: {name} must be an integer >= 1, got {value!r}")


def evaluation_point(optimizer: torch.optim.Optimizer) -> AbstractContextManager[None]:
    """Where ``optimizer``'s model is evaluated: at the average ``x`` for a schedule-free one
    (whose parameters hold ``y`` while training), where they are for every other."""
    if isinstance(optimizer, ScheduleFreeModes):
        return optimizer.averaged()
    return nullcontext()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[int], Tensor],
    steps: int,
    *,
    schedule: Schedule | None = None,
    ema: EMA | None = None,
    clip_grad_norm: float | None = None,
    evaluate: Callable[[], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    metrics: MetricsWriter | None = None,
    tags: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    stop_on_nonfinite: bool = False,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps (numbered 1 .. ``steps``).

    Args:
        batch_loss: ``step -> loss`` (a scalar tensor with a graph): the forward pass on that
            step's minibatch.
        schedule: a :mod:`guided_descent.schedules` schedule, applied through ``LambdaLR``
            (multiplies each group's initial ``lr``; the first step runs at ``schedule(0)``).
        ema: an :class:`~guided_descent.ema.EMA` of ``model``, updated after every step; when
            given, evaluations see its averaged weights (swapped in and out again).

    A schedule-free ``optimizer`` (its parameters hold the training point ``y``) is evaluated at
    its average ``x`` (inside ``optimizer.averaged()``), and an ``ema`` beside it averages ``x``
    too; the parameters hold ``y`` again after each evaluation and when ``train`` returns.
        clip_grad_norm: clip the global gradient norm to this value (``clip_grad_norm_``).
        evaluate: ``() -> scores``, run on the model (no gradient bookkeeping is added: wrap your
            function in ``torch.no_grad`` if it needs it).
        eval_every: evaluate every N steps (and always at step 0 and after the last step).
            Default: only at step 0 and at the end.
        metrics: where to log evaluations; ``tags`` are added to every record.
        on_step: called with the step number after each step (progress bars).
        stop_on_nonfinite: stop at an evaluation whose mean minibatch loss is NaN or infinite
            (learning-rate sweeps: a diverged run costs nothing more).
    """
    _check_positive_int("steps", steps)
    if eval_every is not None:
        _check_positive_int("eval_every", eval_every)
    if clip_grad_norm is not None and not (
        isinstance(clip_grad_norm, (int, float)) and 0.0 < clip_grad_norm < math.inf
    ):
        raise ValueError(
            f"train: clip_grad_norm must be a finite number > 0, got {clip_grad_norm!r}"
        )
    if ema is not None and ema.model is not model:
        raise ValueError("train: the EMA tracks another model than the one being trained")
    every = eval_every or steps
    tags = dict(tags or {})
    sched = scheduler(optimizer, schedule) if schedule is not None else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result = TrainResult()

    def log(step: int, mean_loss: float | None) -> None:
        scores: dict[str, float] = {}
        if evaluate is not None:
            # The mode switch outside the swap: inside it the live weights are the EMA's.
            with evaluation_point(optimizer):
                if ema is not None:
                    with ema.swapped():
                        scores = dict(evaluate())
                else:
                    scores = dict(evaluate())
        record: dict[str, Any] = {"step": step, "batch_loss": mean_loss}
        if sched is not None:
            # The rate the *next* step will use; at step 0, the first step's.
            record["lr"] = [float(g["lr"]) for g in optimizer.param_groups]
        if metrics is not None and hasattr(optimizer, "diagnostics"):
            # At the evaluation cadence only: diagnostics() syncs the device once.
            record["diagnostics"] = summarize(optimizer.diagnostics())
        if metrics is not None:
            metrics.write(event="eval", **tags, **record, **scores)
        result.scores = scores
        result.history.append((step, mean_loss, scores))

    log(0, None)
    device = params[0].device if params else torch.device("cpu")
    running = torch.zeros((), device=device)  # sum of minibatch losses since the last log
    since = 0
    for step in range(1, steps + 1):
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        optimizer.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            with evaluation_point(optimizer):
                ema.update()
        running += loss.detach()
        since += 1
        result.steps = step
        if on_step is not None:
            on_step(step)
        if step % every == 0 or step == steps:
            mean_loss = float(running) / since
            log(step, mean_loss)
            running.zero_()
            since = 0
            if stop_on_nonfinite and not math.isfinite(mean_loss):
                result.diverged = True
                break
    return result


__all__ = ["TrainResult", "evaluation_point", "train"]
