"""Learning-rate schedules: closed-form multipliers of the step, applied through ``LambdaLR``.

A schedule is a small frozen dataclass, validated when it is built, that maps the step ``t``
(0, 1, 2, ...) to a multiplier of every param group's initial learning rate. Each has a length
``steps``; after it the schedule holds its final value. :func:`scheduler` hands a schedule to
``torch.optim.lr_scheduler.LambdaLR``, which multiplies each group's *own* initial ``lr``, so a
routed hybrid (Muon groups at 0.02, AdamW groups at 3e-4) or μP groups with per-layer
multipliers keep their ratios at every step::

    sched = scheduler(opt, join(LinearWarmup(100), Cosine(900, floor=0.1)))
    for x, y in loader:
        loss_fn(model(x), y).backward()
        opt.step(); opt.zero_grad()
        sched.step()

Shapes, with ``u = t / steps`` clipped to ``[0, 1]``:

* :class:`Constant` -- ``value``;
* :class:`LinearWarmup` -- ``start + (1 - start) u`` (from ``start`` up to 1);
* :class:`Cosine` -- ``floor + (1 - floor) (1 + cos(pi u)) / 2`` (Loshchilov & Hutter 2017,
  arXiv 1608.03983, without restarts);
* :class:`LinearDecay` -- ``floor + (1 - floor) (1 - u)``;
* :class:`SqrtDecay` -- ``floor + (1 - floor) (1 - sqrt(u))``, the "1-sqrt" cool-down of
  Hägele et al. 2024 (arXiv 2405.18392);
* :class:`WSD` -- warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv 2404.06395): a linear
  warm-up, a constant plateau, then a linear or 1-sqrt cool-down to ``floor``;
* :class:`Join` (:func:`join`) -- pieces one after another, each on its own clock.

Schedules act outside ``optimizer.step`` (DESIGN rule 3): no optimizer knows about them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch.optim.lr_scheduler import LambdaLR

CooldownShape = Literal["linear", "1-sqrt"]
COOLDOWN_SHAPES: tuple[str, ...] = get_args(CooldownShape)


def _check_steps(owner: str, steps: object, minimum: int = 1) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise ValueError(f"{owner}: steps must be an integer >= {minimum}, got {steps!r}")


def _check_level(owner: str, name: str, value: object) -> None:
    """A multiplier level (``start``, ``floor``): a finite number in [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= value <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")


def _progress(step: int, steps: int) -> float:
    """``step / steps`` clipped to [0, 1]."""
    return min(1.0, step / steps)


@dataclass(frozen=True)
class Schedule:
    """Base class: ``schedule(step) -> multiplier``; ``steps`` is the length of the schedule.

    Subclasses implement :meth:`multiplier` for ``step >= 0``; ``__call__`` checks the step.
    """

    steps: int

    def __post_init__(self) -> None:
        _check_steps(type(self).__name__, self.steps)

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{type(self).__name__}: step must be an integer >= 0, got {step!r}")
        return self.multiplier(step)


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step. ``steps`` (default 0) only matters inside a :class:`Join`."""

    steps: int = 0
    value: float = 1.0

    def __post_init__(self) -> None:
        _check_steps("Constant", self.steps, minimum=0)
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < math.inf:
            raise ValueError(f"Constant: value must be a finite number >= 0, got {v!r}")

    def multiplier(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """From ``start`` (at step 0) linearly up to 1 (at step ``steps``), then 1.

    With the default ``start=0`` the very first optimizer step has learning rate 0; pass a small
    ``start`` (e.g. ``1 / steps``) if every step should move the weights.
    """

    start: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_level("LinearWarmup", "start", self.start)

    def multiplier(self, step: int) -> float:
        return self.start + (1.0 - self.start) * _progress(step, self.steps)


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from 1 (step 0) down to ``floor`` (step ``steps``), then ``floor``."""

    floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_level("Cosine", "floor", self.floor)

    def multiplier(self, step: int) -> float:
        u = _progress(step, self.steps)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * u))


@dataclass(frozen=True)
class LinearDecay(Schedule):
    """From 1 (step 0) linearly down to ``floor`` (step ``steps``), then ``floor``."""

    floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_level("LinearDecay", "floor", self.floor)

    def multiplier(self, step: int) -> float:
        return self.floor + (1.0 - self.floor) * (1.0 - _progress(step, self.steps))


@dataclass(frozen=True)
class SqrtDecay(Schedule):
    """``1 - sqrt(u)`` from 1 down to ``floor``: drops fast at first, then levels off."""

    floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_level("SqrtDecay", "floor", self.floor)

    def multiplier(self, step: int) -> float:
        u = _progress(step, self.steps)
        return self.floor + (1.0 - self.floor) * (1.0 - math.sqrt(u))


@dataclass(frozen=True)
class WSD(Schedule):
    """Warmup-stable-decay over ``steps``: ``warmup`` steps up, a plateau at 1, ``cooldown`` down.

    The plateau lasts ``steps - warmup - cooldown`` steps (it may be empty). The cool-down is
    ``"linear"`` or ``"1-sqrt"`` and ends at ``floor``; the warm-up starts at 0. Its appeal: the
    plateau can be extended (or a run branched into a cool-down at any point) without knowing the
    final length up front.
    Equal, step for step, to ``join(LinearWarmup(warmup), Constant(plateau),
    LinearDecay/SqrtDecay(cooldown, floor))``.
    """

    warmup: int = 0
    cooldown: int = 0
    shape: CooldownShape = "linear"
    floor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("warmup", "cooldown"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"WSD: {name} must be an integer >= 0, got {v!r}")
        if self.warmup + self.cooldown > self.steps:
            raise ValueError(
                f"WSD: warmup + cooldown ({self.warmup} + {self.cooldown}) exceeds steps "
                f"({self.steps})"
            )
        if self.shape not in COOLDOWN_SHAPES:
            raise ValueError(f"WSD: shape must be one of {COOLDOWN_SHAPES}, got {self.shape!r}")
        _check_level("WSD", "floor", self.floor)

    def multiplier(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        decay_start = self.steps - self.cooldown
        if step < decay_start or self.cooldown == 0:
            return 1.0
        u = _progress(step - decay_start, self.cooldown)
        fall = u if self.shape == "linear" else math.sqrt(u)
        return self.floor + (1.0 - self.floor) * (1.0 - fall)


@dataclass(frozen=True, init=False)
class Join(Schedule):
    """Pieces one after another: piece ``i`` runs on its own clock for its ``steps``.

    At step ``t`` the active piece is the one whose interval ``[start_i, start_i + steps_i)``
    holds ``t``, evaluated at ``t - start_i``; past the end, the last piece holds its final
    value. ``steps`` is the sum of the pieces' lengths.
    """

    pieces: tuple[Schedule, ...]

    def __init__(self, pieces: Iterable[Schedule]) -> None:
        pieces = tuple(pieces)
        if not pieces:
            raise ValueError("Join: needs at least one schedule, got none")
        for i, piece in enumerate(pieces):
            if not isinstance(piece, Schedule):
                raise ValueError(
                    f"Join: piece {i} must be a Schedule, got {type(piece).__name__} {piece!r}"
                )
        object.__setattr__(self, "pieces", pieces)
        object.__setattr__(self, "steps", sum(p.steps for p in pieces))

    def multiplier(self, step: int) -> float:
        start = 0
        for piece in self.pieces[:-1]:
            if step < start + piece.steps:
                return piece(step - start)
            start += piece.steps
        return self.pieces[-1](step - start)


def join(*pieces: Schedule) -> Join:
    """``join(LinearWarmup(100), Cosine(900))``: the pieces one after another (:class:`Join`)."""
    return Join(pieces)


def scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1
) -> LambdaLR:
    """A ``LambdaLR`` that sets every group's ``lr`` to its initial ``lr`` times ``schedule(t)``.

    Call ``.step()`` after each ``optimizer.step()``; the first optimizer step runs at
    ``schedule(0)``. The schedule is wrapped in a plain function on purpose: ``LambdaLR`` saves
    the attributes of callable *objects* into its ``state_dict``, which would put our dataclasses
    into checkpoints (and break ``torch.load(weights_only=True)``). A schedule is configuration,
    rebuilt from code; the scheduler's state is its step count and base learning rates.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")

    def lr_lambda(step: int) -> float:
        return schedule(step)

    return LambdaLR(optimizer, lr_lambda=lr_lambda, last_epoch=last_epoch)


__all__ = [
    "COOLDOWN_SHAPES",
    "WSD",
    "Constant",
    "Cosine",
    "CooldownShape",
    "Join",
    "LinearDecay",
    "LinearWarmup",
    "Schedule",
    "SqrtDecay",
    "join",
    "scheduler",
]
