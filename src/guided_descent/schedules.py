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

For the 1cycle policy (Smith & Topin 2017, arXiv 1708.07120) use :func:`one_cycle`, not
``OneCycleLR(opt, max_lr=scalar)``: a scalar ``max_lr`` gives every group the same peak, and by
default ``OneCycleLR`` also overwrites every group's momentum or beta1 with one cycling value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

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


AnnealShape = Literal["cos", "linear"]
ANNEAL_SHAPES: tuple[str, ...] = get_args(AnnealShape)


def _positive(owner: str, name: str, value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 < value < math.inf:  # type: ignore[operator]
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    peak: float | None = None,
    reference: int = 0,
    pct_start: float = 0.3,
    anneal: AnnealShape = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> OneCycleLR:
    """A ``OneCycleLR`` that keeps every param group's learning rate in its ratio to the others.

    ``OneCycleLR(opt, max_lr=0.02)`` gives *every* group the peak 0.02: a routed hybrid (Muon
    groups at 0.02, AdamW groups at 3e-4) or a μP plan (per-layer multipliers) loses its ratios
    for the whole run. Here each group's peak is its current ``lr`` times one factor, passed to
    ``OneCycleLR`` as a list: the factor is 1 without ``peak`` (each group peaks at its own
    ``lr``), else ``peak / lr`` of group ``reference``, which then peaks at exactly ``peak``.
    Every group follows the same shape: from ``peak_g / div_factor`` up to ``peak_g`` over the
    first ``pct_start`` of ``total_steps`` (cosine or linear ``anneal``), then down to
    ``peak_g / (div_factor * final_div_factor)``; ``three_phase`` as in ``OneCycleLR``.

    Momentum is not cycled (``cycle_momentum=False``): ``OneCycleLR`` picks ``momentum`` or
    ``betas`` once, from ``optimizer.defaults``, and writes one value into every group -- a
    Shampoo optimizer's Shampoo and AdamW groups would share one beta1, a Muon optimizer's AdamW
    group would get a ``momentum`` it never reads.

    Build it once, on an optimizer whose ``lr`` values are still the ones it was made with (the
    scheduler itself moves them). Call ``.step()`` after each ``optimizer.step()``; the first step
    runs at ``peak_g / div_factor``. Raises ``ValueError`` naming a bad argument.
    """
    owner = "one_cycle"
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{owner}: total_steps must be an integer >= 1, got {total_steps!r}")
    groups = optimizer.param_groups
    if isinstance(reference, bool) or not isinstance(reference, int) or not (
        0 <= reference < len(groups)
    ):
        raise ValueError(
            f"{owner}: reference must be a param group index in [0, {len(groups) - 1}], "
            f"got {reference!r}"
        )
    ok = isinstance(pct_start, (int, float)) and not isinstance(pct_start, bool)
    if not ok or not 0.0 < pct_start < 1.0:
        raise ValueError(f"{owner}: pct_start must be a number in (0, 1), got {pct_start!r}")
    if anneal not in ANNEAL_SHAPES:
        raise ValueError(f"{owner}: anneal must be one of {ANNEAL_SHAPES}, got {anneal!r}")
    div_factor = _positive(owner, "div_factor", div_factor)
    final_div_factor = _positive(owner, "final_div_factor", final_div_factor)
    lrs = [float(g["lr"]) for g in groups]  # a tensor lr becomes its value
    scale = 1.0
    if peak is not None:
        peak = _positive(owner, "peak", peak)
        if not lrs[reference] > 0.0:
            raise ValueError(
                f"{owner}: param group {reference} has lr {lrs[reference]!r}, so peak={peak!r} "
                "sets no ratio; choose another reference group"
            )
        scale = peak / lrs[reference]
    return OneCycleLR(
        optimizer,
        max_lr=[scale * lr for lr in lrs],
        total_steps=total_steps,
        pct_start=float(pct_start),
        anneal_strategy=anneal,
        cycle_momentum=False,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
    )


__all__ = [
    "ANNEAL_SHAPES",
    "COOLDOWN_SHAPES",
    "WSD",
    "AnnealShape",
    "Constant",
    "Cosine",
    "CooldownShape",
    "Join",
    "LinearDecay",
    "LinearWarmup",
    "Schedule",
    "SqrtDecay",
    "join",
    "one_cycle",
    "scheduler",
]
