"""The runs of ``linear-representation``: one cell's problems, each method's update, the race.

A :class:`Cell` holds one ``(κ_x, κ_F)`` cell's problems stacked over seeds. A :class:`Run` is one
method at one grid value on a cell, all seeds at once: the hand-written rules, SGD and Adam stack
the seeds along a leading dimension (:class:`StackedRun`, :class:`FirstOrderRun`); the library's
optimizers, which treat a 3-D tensor differently from a matrix, get one model per seed
(:class:`LibraryRun`). :func:`run_cell` advances every run of a cell in lockstep on the same
batches, records steps-to-0.1 exactly to the step, and prunes each method's grid as a race
(:func:`prune_race`) without changing its winner.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import guided_descent
from guided_descent.experiments.records import MetricsWriter
from guided_descent.tasks import linear_representation as task

if TYPE_CHECKING:
    from guided_descent.experiments.linear_representation import Config

HAND_WRITTEN: tuple[str, ...] = ("layerwise", "layerwise_one_sided", "gauss_newton")
FIRST_ORDER: tuple[str, ...] = ("sgd", "adam")
LIBRARY: tuple[str, ...] = ("kfac", "shampoo", "soap", "muon")
METHODS: tuple[str, ...] = HAND_WRITTEN + FIRST_ORDER + LIBRARY

# The library optimizers' settings besides the learning rate (everything else: registry defaults).
LIBRARY_SETTINGS: dict[str, dict[str, Any]] = {
    # The sampled Fisher of a unit-variance Gaussian likelihood has exactly the paper's factors
    # (S = FᵀF for G, S = I for F; A = Σ̂_x, Σ̂_z): K-FAC can then reproduce the layer-wise rule.
    # The empirical Fisher would instead scale S with the squared residual, which vanishes as the
    # fit improves. Momentum and KL clipping are off because the paper's rule has neither and
    # they would confound "does the preconditioner carry over"; damping (1e-3), the factor EMA
    # (0.95), the inverse refresh every 10 steps and the simultaneous update of both layers stay
    # the library's.
    "kfac": {"fisher": "sampled", "momentum": 0.0, "kl_clip": None},
    # Both layers go to the matrix method: the default routing sends the last Linear (here the
    # head F, a small k x d_Y matrix, not a vocabulary-sized classifier) to AdamW, which would mix
    # two optimizers and two learning rates in one comparison.
    "shampoo": {"routing": {"*": "shampoo"}},
    # SOAP's registry default has weight_decay 0.01; no other method here decays weights.
    "soap": {"routing": {"*": "soap"}, "weight_decay": 0.0},
    "muon": {"routing": {"*": "muon"}},
}

TARGET_DIST = 0.1  # the protocol's steps-to-0.1 (EXPERIMENTS.md §1)

# A run whose parameters leave this ball (or go non-finite) has diverged: a solution has
# ‖FG‖ = ‖F⋆‖ ≤ √k, so 1e6 is far outside anything that converges.
DIVERGED_NORM = 1e6
REACHED, NOT_REACHED, DIVERGED = "reached", "not reached", "diverged"
STOPPED = "stopped"


def cell_key(kappa_x: float, kappa_f: float) -> str:
    """A cell's key in ``summary.json``: ``"100,10"``."""
    return f"{kappa_x:g},{kappa_f:g}"


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True)
class Cell:
    """One ``(κ_x, κ_F)`` cell's problems, stacked over seeds, on the run's device."""

    kappa_x: float
    kappa_f: float
    sigma_x: Tensor  # (S, d_X, d_X)
    sigma_x_sqrt: Tensor  # (S, d_X, d_X)
    g_star: Tensor  # (S, k, d_X)
    target: Tensor  # (S, d_Y, d_X): F⋆G⋆
    g0: Tensor  # (S, k, d_X): the shared initial G
    f0: Tensor  # (S, d_Y, k): the first-order methods' initial F
    problems: tuple[task.Problem, ...]  # CPU copies, for the transfer task

    @property
    def seeds(self) -> int:
        return self.g_star.shape[0]


# Seed offsets of the independent random streams of one seed (problem draw, inits, data, ...).
_PROBLEM, _INIT, _DATA, _FISHER, _TRANSFER_TASK, _TRANSFER_DATA = range(6)


def _generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1_000_003 * stream + seed)


def make_cell(config: Config, kappa_x: float, kappa_f: float, device: torch.device) -> Cell:
    """The cell's problems: seed ``s`` fixes ``Q``, ``G⋆``, ``F⋆``'s bases and the inits, so one
    seed's problems at different ``(κ_x, κ_F)`` differ only in their spectra."""
    problems, g0, f0 = [], [], []
    for s in range(config.seeds):
        problems.append(
            task.make_problem(
                config.d_x,
                config.k,
                config.d_y,
                kappa_x,
                kappa_f,
                _generator(s, _PROBLEM),
                rotated=config.rotated,
            )
        )
        gen = _generator(s, _INIT)
        g0.append(task.init_first_layer(config.k, config.d_x, gen))
        f0.append(task.init_head(config.d_y, config.k, gen))

    def stack(values: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(values)).to(device)

    return Cell(
        float(kappa_x),
        float(kappa_f),
        stack([p.sigma_x for p in problems]),
        stack([p.sigma_x_sqrt for p in problems]),
        stack([p.g_star for p in problems]),
        stack([p.target for p in problems]),
        stack(g0),
        stack(f0),
        tuple(problems),
    )


@dataclass(frozen=True)
class Batches:
    """One step's data, per seed: ``x, y`` for every method (and the layer-wise G-step),
    ``x_b, y_b`` for the layer-wise F-step, which the protocol puts on a fresh batch."""

    x: Tensor  # (S, B, d_X)
    y: Tensor  # (S, B, d_Y)
    x_b: Tensor
    y_b: Tensor
    sigma_x: Tensor  # (S, d_X, d_X): second moment of x, shared by the methods that use it


class Run:
    """One method at one grid value on one cell, all seeds: ``F`` ``(S, d_Y, k)``, ``G``
    ``(S, k, d_X)``. Subclasses implement :meth:`advance`, :meth:`weights`, :meth:`reset_rows`.

    Per seed it records the first step with distance <= 0.1 (``reached_at``; "steps-to-0.1") and
    the step at which the parameters blew up (``diverged_at``); a blown-up seed can no longer
    reach. ``stopped_at`` is set when the run lost its grid race (:func:`prune_race`).
    """

    def __init__(self, method: str, hyper: float | None, cell: Cell) -> None:
        self.method = method
        self.hyper = hyper
        self.cell = cell
        n = cell.seeds
        self.diverged_at: list[int | None] = [None] * n
        self.reached_at: list[int | None] = [None] * n
        self.stopped_at: int | None = None
        self.racing = True  # False: never stopped by its race (it still sets the bar)
        self.last_dist: Tensor | None = None  # (S,) at the last step the run took
        self.dist_compare: list[float | None] | None = None
        self.g_compare: Tensor | None = None
        self.warnings = 0

    def advance(self, batches: Batches, step: int) -> None:
        raise NotImplementedError

    def weights(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def reset_rows(self, rows: list[int]) -> None:
        """Put blown-up seeds back on finite values so that batched solves stay defined; they
        stay flagged and their numbers are never used."""
        raise NotImplementedError

    @property
    def alive(self) -> list[bool]:
        """Per seed: not blown up."""
        return [d is None for d in self.diverged_at]

    @property
    def active(self) -> bool:
        """Still stepped: not stopped by its race, and some seed has not blown up."""
        return self.stopped_at is None and any(self.alive)

    def guard(self, step: int) -> None:
        """Flag seeds whose parameters blew up (non-finite or norm > :data:`DIVERGED_NORM`)."""
        f, g = self.weights()
        size = torch.maximum(
            torch.linalg.vector_norm(f.flatten(1), dim=1),
            torch.linalg.vector_norm(g.flatten(1), dim=1),
        )
        bad = ~(size <= DIVERGED_NORM)  # NaN compares False, so it counts as bad
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()
            for s in rows:
                if self.diverged_at[s] is None:
                    self.diverged_at[s] = step
            self.reset_rows(rows)

    def counts(self, budget: int) -> list[float | None]:
        """Per seed: steps-to-0.1 if reached; ``budget + 1`` if it blew up first; else ``None``
        (still running)."""
        return [
            float(at) if at is not None else (float(budget + 1) if dv is not None else None)
            for at, dv in zip(self.reached_at, self.diverged_at, strict=True)
        ]

    def median_upper(self, budget: int) -> float:
        """An upper bound on the final median steps-to-0.1 (inf while a majority is open)."""
        return _median([math.inf if c is None else c for c in self.counts(budget)])

    def median_lower(self, step: int, budget: int) -> float:
        """A lower bound after ``step``: a seed still running needs at least ``step + 1``."""
        return _median([float(step + 1) if c is None else c for c in self.counts(budget)])


class StackedRun(Run):
    """Seeds stacked along the first dimension; one update for all of them per step."""

    def __init__(
        self,
        method: str,
        hyper: float | None,
        cell: Cell,
        f0: Tensor,
        update: Callable[[Tensor, Tensor, Batches], tuple[Tensor, Tensor]],
    ) -> None:
        super().__init__(method, hyper, cell)
        self.f0 = f0.clone()
        self.f, self.g = f0.clone(), cell.g0.clone()
        self.update = update

    def advance(self, batches: Batches, step: int) -> None:
        self.f, self.g = self.update(self.f, self.g, batches)

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.f, self.g

    def reset_rows(self, rows: list[int]) -> None:
        self.f[rows] = self.f0[rows]
        self.g[rows] = self.cell.g0[rows]


class FirstOrderRun(Run):
    """SGD / Adam from the registry on stacked ``(S, ...)`` leaf tensors.

    Both update rules act entrywise given the gradient, and seed ``s``'s gradient depends only on
    row ``s``, so the rows are exactly independent runs sharing one optimizer call.
    """

    def __init__(self, method: str, lr: float, cell: Cell) -> None:
        super().__init__(method, lr, cell)
        self.f, self.g = cell.f0.clone(), cell.g0.clone()
        # Seeds share tensors, and divergence must show as such: no non-finite guard.
        self.optimizer = guided_descent.create(method, [self.f, self.g], lr=lr, on_nonfinite="off")

    def advance(self, batches: Batches, step: int) -> None:
        self.f.grad, self.g.grad = task.gradients(self.f, self.g, batches.x, batches.y)
        self.optimizer.step()

    def weights(self) -> tuple[Tensor, Tensor]:
        return self.f, self.g

    def reset_rows(self, rows: list[int]) -> None:
        # The optimizer state of those rows may hold inf/NaN; the rows stay flagged either way.
        self.f[rows] = self.cell.f0[rows]
        self.g[rows] = self.cell.g0[rows]


def make_model(g0: Tensor, f0: Tensor) -> nn.Sequential:
    """``x ↦ F G x`` as two bias-free ``nn.Linear`` layers (so K-FAC hooks both), float64."""
    k, d_x = g0.shape
    d_y = f0.shape[0]
    model = nn.Sequential(nn.Linear(d_x, k, bias=False), nn.Linear(k, d_y, bias=False))
    model = model.to(device=g0.device, dtype=g0.dtype)
    with torch.no_grad():
        model[0].weight.copy_(g0)
        model[1].weight.copy_(f0)
    return model


class LibraryRun(Run):
    """A library optimizer on one ``nn.Sequential`` per seed, stepped through autograd.

    Library warnings (e.g. a failed inverse root on a blowing-up run) are counted rather than
    printed; a seed that blows up is no longer stepped.
    """

    def __init__(self, method: str, lr: float, cell: Cell) -> None:
        super().__init__(method, lr, cell)
        device = cell.g0.device
        self.models = [make_model(cell.g0[s], cell.f0[s]) for s in range(cell.seeds)]
        settings = LIBRARY_SETTINGS.get(method, {})
        self.optimizers = [
            guided_descent.create(method, m, lr=lr, on_nonfinite="off", **settings)
            for m in self.models
        ]
        self.fisher_generators = [_generator(s, _FISHER, device) for s in range(cell.seeds)]

    def advance(self, batches: Batches, step: int) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
                if self.diverged_at[s] is not None:
                    continue
                with torch.enable_grad():
                    out = model(batches.x[s])
                    loss = 0.5 * (out - batches.y[s]).pow(2).sum(-1).mean()
                    opt.zero_grad(set_to_none=True)
                    if self.method == "kfac":
                        opt.sample_fisher(out, "gaussian", self.fisher_generators[s])
                    loss.backward()
                opt.step()
        self.warnings += len(caught)

    def weights(self) -> tuple[Tensor, Tensor]:
        f = torch.stack([m[1].weight.detach() for m in self.models])
        g = torch.stack([m[0].weight.detach() for m in self.models])
        return f, g

    def reset_rows(self, rows: list[int]) -> None:
        with torch.no_grad():
            for s in rows:
                self.models[s][0].weight.copy_(self.cell.g0[s])
                self.models[s][1].weight.copy_(self.cell.f0[s])


def make_run(method: str, hyper: float | None, cell: Cell, config: Config) -> Run:
    """The run of ``method`` at grid value ``hyper`` on ``cell``."""
    if method in FIRST_ORDER:
        return FirstOrderRun(method, float(hyper), cell)  # type: ignore[arg-type]
    if method in LIBRARY:
        return LibraryRun(method, float(hyper), cell)  # type: ignore[arg-type]
    zero_head = torch.zeros_like(cell.f0)
    if method in ("layerwise", "layerwise_one_sided"):
        one_sided = method == "layerwise_one_sided"

        def sweep(f: Tensor, g: Tensor, b: Batches) -> tuple[Tensor, Tensor]:
            g = task.layerwise_g_step(
                f, g, b.x, b.y, config.eta_g, config.damping, one_sided, b.sigma_x
            )
            f = task.layerwise_f_step(f, g, b.x_b, b.y_b, config.eta_f, config.damping)
            return f, g

        return StackedRun(method, None, cell, zero_head, sweep)
    if method == "gauss_newton":
        damping = float(hyper)  # type: ignore[arg-type]

        def gn(f: Tensor, g: Tensor, b: Batches) -> tuple[Tensor, Tensor]:
            return task.gauss_newton_step(f, g, b.x, b.y, damping, sigma_x=b.sigma_x)

        run = StackedRun(method, damping, cell, zero_head, gn)
        # Claim 4 asks whether Gauss-Newton is stable at the layer-wise rule's own damping, so
        # that run must see the whole budget even when another damping wins the race.
        run.racing = damping != config.damping
        return run
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------- the stepping


def logged_steps(steps: int, every: int) -> list[int]:
    """Steps whose distances go to ``metrics.jsonl``: 0..20, then every ``every``, and the last."""
    marks = set(range(min(steps, 20) + 1)) | set(range(0, steps + 1, every)) | {steps}
    return sorted(marks)


def _distances(runs: Sequence[Run], cell: Cell) -> Tensor:
    """``(R, S)`` subspace distances of every run's ``G`` in one batched call."""
    g = torch.stack([r.weights()[1] for r in runs])  # (R, S, k, d_X)
    return task.subspace_distance(g, cell.g_star.unsqueeze(0))


def _excess_loss(runs: Sequence[Run], cell: Cell) -> Tensor:
    """``(R, S)`` population loss above the noise floor, ``½ tr(ΔΣ_xΔᵀ)``, ``Δ = W⋆ − FG``."""
    f = torch.stack([r.weights()[0] for r in runs])
    g = torch.stack([r.weights()[1] for r in runs])
    return 0.5 * task.population_risk(f, g, cell.target.unsqueeze(0), cell.sigma_x.unsqueeze(0))


def _plain(values: Tensor, alive: Sequence[bool]) -> list[float | None]:
    """Per-seed floats for JSON; blown-up seeds are ``None``."""
    return [v if ok else None for v, ok in zip(values.tolist(), alive, strict=True)]


def prune_race(race: Sequence[Run], step: int, budget: int) -> None:
    """Stop the runs of one method's grid (on one cell) that can no longer win, after ``step``.

    The winner has the smallest median steps-to-0.1 (:func:`select`). Once some run's median is
    known to be at most ``bar``, a run whose median is bound to exceed ``bar`` can neither win
    nor tie, so stepping it further would change nothing that is selected -- only its own
    unused numbers. The run that sets the bar is never stopped, nor is any run that could still
    tie, so the winner and its tie-break are exactly those of running the whole grid.
    """
    bar = min((r.median_upper(budget) for r in race if r.stopped_at is None), default=math.inf)
    if math.isinf(bar):
        return  # no run has a known median yet
    for r in race:
        # A run whose every seed blew up has ended with an exact median: nothing to stop.
        if r.racing and r.active and r.median_lower(step, budget) > bar:
            r.stopped_at = step


def run_cell(
    config: Config,
    cell: Cell,
    runs: Sequence[Run],
    metrics: MetricsWriter,
    bar: Any,
) -> None:
    """Advance every run of ``cell`` for ``config.steps`` steps in lockstep, racing each tuned
    method's grid (:func:`prune_race`). Records steps-to-0.1, the distance and ``G`` at
    ``compare_at``, the last distances and the logged curves on the way."""
    device = cell.g_star.device
    generators = [_generator(s, _DATA, device) for s in range(cell.seeds)]
    marks = set(logged_steps(config.steps, config.log_every))
    races = [
        [r for r in runs if r.method == m]
        for m in dict.fromkeys(r.method for r in runs)
        if sum(r.method == m for r in runs) > 1
    ]

    def draw() -> tuple[Tensor, Tensor]:
        return task.sample(
            cell.sigma_x_sqrt, cell.target, config.noise, config.batch_size, generators
        )

    def record(step: int, stepped: Sequence[Run], dist: Tensor) -> None:
        loss = _excess_loss(stepped, cell)
        for i, r in enumerate(stepped):
            metrics.write(
                event="step",
                kappa_x=cell.kappa_x,
                kappa_f=cell.kappa_f,
                method=r.method,
                hyper=r.hyper,
                step=step,
                dist=_plain(dist[i], r.alive),
                excess_loss=_plain(loss[i], r.alive),
            )

    dist = _distances(runs, cell)
    for i, r in enumerate(runs):
        r.last_dist = dist[i]
    record(0, runs, dist)
    for step in range(1, config.steps + 1):
        stepped = [r for r in runs if r.active]
        if stepped:
            x, y = draw()
            x_b, y_b = draw()
            batches = Batches(x, y, x_b, y_b, task.second_moment(x))
            for r in stepped:
                r.advance(batches, step)
                r.guard(step)
            dist = _distances(stepped, cell)
            hit = (dist <= TARGET_DIST).tolist()
            for i, r in enumerate(stepped):
                r.last_dist = dist[i]
                for s, h in enumerate(hit[i]):
                    if h and r.reached_at[s] is None and r.diverged_at[s] is None:
                        r.reached_at[s] = step
            if step == config.compare_at:
                for i, r in enumerate(stepped):
                    r.dist_compare = _plain(dist[i], r.alive)
                    r.g_compare = r.weights()[1].clone()
            for race in races:
                prune_race(race, step, config.steps)
            if step in marks:
                record(step, stepped, dist)
        bar.update(1)
