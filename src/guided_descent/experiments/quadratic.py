"""``quadratic``: iterations to a fixed accuracy against the condition number (EXPERIMENTS.md §4).

On ``f(θ) = ½ θᵀAθ`` with eigenvalues log-spaced in ``[1/κ, 1]`` and a random rotation, count the
iterations each method needs to bring the relative error ``‖θ_t - θ⋆‖ / ‖θ₀ - θ⋆‖`` to ``tol``:

* ``sgd`` -- gradient descent with ``η = 1/L`` (theory: iterations ∝ κ);
* ``momentum`` -- Polyak's heavy ball with its optimal ``η, β`` (∝ √κ);
* ``nesterov`` -- Nesterov's method with ``η = 1/L, β = (√κ-1)/(√κ+1)`` (∝ √κ);
* ``adam`` -- Adam with the registry's betas and eps, at the best learning rate of a log grid,
  chosen per κ by the median over seeds (no theory for its slope: it is measured);
* ``newton`` -- ``θ ← θ - A⁻¹∇f(θ)`` (one step on a quadratic).

The first four are the library's ``torch.optim`` optimizers fed the analytic gradient ``Aθ``
through ``p.grad``. A *track* is all seeds of one (method, κ, hyper-parameters) stacked as one
``(seeds, d)`` tensor: every update rule here is elementwise given the gradient and row ``s``'s
gradient uses only row ``s``, so the rows are independent runs that share one optimizer call.
Each track has its own optimizer and is stepped only while it has a row left to finish, so a method
costs one loop whose length is its slowest run, and a finished track costs nothing more.

Adam's grid is run as a race per κ: once the best median over seeds so far is known, a learning
rate whose median can no longer match it (its unfinished rows already count more iterations) is
stopped. The winner is the same as running every learning rate to the budget; only the losers'
exact counts are not known ("stopped after t").

A run that misses ``tol`` within the budget counts as ``budget + 1`` iterations (and is shown as
not reached). ``metrics.jsonl`` gets one ``run`` record per (method, κ, seed[, lr]) and one
``curve`` record per track (the error at log-spaced iterations); ``summary.json`` the per-κ
iteration counts, the fitted log-log slopes and the claims.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor

import guided_descent
from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import Claim, MetricsWriter, Outcome, RunDir, require_seeds
from guided_descent.optimizers import get_spec
from guided_descent.tasks import quadratic as task

METHODS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adam", "newton")
LABELS: dict[str, str] = {
    "sgd": "GD (η = 1/L)",
    "momentum": "heavy ball",
    "nesterov": "Nesterov",
    "adam": "Adam (best lr)",
    "newton": "Newton",
}
# Slope of log(iterations) against log(κ) that theory predicts; Adam has none.
THEORY_SLOPES: dict[str, float] = {"sgd": 1.0, "momentum": 0.5, "nesterov": 0.5, "newton": 0.0}

# Claim thresholds, fixed by EXPERIMENTS.md §4 before any run.
GD_SLOPE_RANGE = (0.9, 1.1)
HEAVY_BALL_SLOPE_RANGE = (0.4, 0.6)
NEWTON_MAX_STEPS = 1

REACHED, NOT_REACHED, DIVERGED, STOPPED = "reached", "not reached", "diverged", "stopped"
# How often (in iterations) a track looks for rows that overflowed to inf / NaN.
NAN_CHECK_EVERY = 1000


def _half_decades(lo_exp: int, hi_exp: int) -> tuple[float, ...]:
    """``10^lo, 10^(lo+1/2), ..., 10^hi``, to 4 significant digits (readable on the CLI)."""
    return tuple(float(f"{10.0 ** (k / 2):.4g}") for k in range(2 * lo_exp, 2 * hi_exp + 1))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Iterations to relative error ``tol`` on ``½ θᵀAθ`` for GD, momentum, Adam and Newton."""

    optimizers: tuple[str, ...] = option(
        METHODS,
        "methods: sgd (GD, lr 1/L), momentum (heavy ball), nesterov (optimal constants), "
        "adam (best lr of adam_lrs), newton",
    )
    kappas: tuple[float, ...] = option(
        _half_decades(1, 4), "condition numbers kappa (eigenvalues log-spaced in [1/kappa, 1])"
    )
    dim: int = option(100, "dimension d of theta")
    tol: float = option(1e-6, "target relative error ||theta_t - theta*|| / ||theta_0 - theta*||")
    seeds: int = option(3, "number of seeds (0, 1, ..., N-1); each draws a rotation and a start")
    steps: int = option(
        150_000,
        "iteration budget per run; a run that misses tol counts as steps + 1 (GD needs about "
        "1.2e5 at kappa 1e4, d 100)",
    )
    adam_lrs: tuple[float, ...] = option(
        (*_half_decades(-3, 0), 3.0), "Adam's learning-rate grid; the best is picked per kappa"
    )
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        for name in self.optimizers:
            if name not in METHODS:
                raise ValueError(
                    f"unknown method {name!r} for quadratic; accepted: {', '.join(METHODS)}"
                )
        super().__post_init__()
        if not self.kappas or not all(_is_real(k) and k >= 1 for k in self.kappas):
            raise ValueError(f"kappas must be finite numbers >= 1, got {self.kappas!r}")
        if len(set(self.kappas)) < 2:
            raise ValueError(
                f"kappas must hold at least two different values (a slope needs two points), "
                f"got {self.kappas!r}"
            )
        if len(set(self.kappas)) != len(self.kappas):
            raise ValueError(f"kappas lists a value twice: {self.kappas!r}")
        if not _is_int(self.dim) or self.dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {self.dim!r}")
        if not _is_real(self.tol) or not 0 < self.tol < 1:
            raise ValueError(f"tol must be a number in (0, 1), got {self.tol!r}")
        if "adam" in self.optimizers and not self.adam_lrs:
            raise ValueError("adam_lrs must hold at least one learning rate when adam is run")
        if not all(_is_real(lr) and lr > 0 for lr in self.adam_lrs):
            raise ValueError(f"adam_lrs must be finite numbers > 0, got {self.adam_lrs!r}")
        if len(set(self.adam_lrs)) != len(self.adam_lrs):
            raise ValueError(f"adam_lrs lists a value twice: {self.adam_lrs!r}")

    @classmethod
    def quick(cls) -> Self:
        """κ in {10, 46, 215, 1000}, d = 50, a 30 000-step budget, 4 Adam learning rates."""
        return cls(
            kappas=(10.0, 46.42, 215.4, 1000.0),
            dim=50,
            steps=30_000,
            adam_lrs=(1e-3, 1e-2, 1e-1, 1.0),
        )


def method_constants(method: str, mu: float, L: float) -> dict[str, float]:
    """The tuned ``lr`` (and ``momentum``) of ``sgd``, ``momentum`` or ``nesterov``."""
    match method:
        case "sgd":
            return task.gd_constants(mu, L)
        case "momentum":
            return task.heavy_ball_constants(mu, L)
        case "nesterov":
            return task.nesterov_constants(mu, L)
    raise ValueError(f"method {method!r} has no closed-form constants")


# Iterations at which a track's errors go into its convergence curve: every one up to 10, then
# 20 per decade, which draws a smooth line on a log axis at a few hundred numbers per track.
def _curve_steps(budget: int) -> frozenset[int]:
    marks = set(range(1, min(budget, 10) + 1))
    k = 20
    while (t := round(10 ** (k / 20))) <= budget:
        marks.add(t)
        k += 1
    return frozenset(marks)


@dataclass(eq=False)
class Track:
    """The seeds of one (method, κ, hyper-parameters): one ``(S, d)`` float64 iterate.

    ``iterations[s]`` is the first iteration at which row ``s``'s relative error is at most
    ``tol`` (``None`` until then); ``status[s]`` says how the row ended (``None`` while running).
    A row keeps being updated after it ends if other rows of its track still run; that changes
    nothing recorded, since rows do not interact.
    """

    method: str
    kappa: float
    hyper: dict[str, float]
    hessians: Tensor  # (S, d, d) float64
    theta0: Tensor  # (S, d) float64
    tol: float
    budget: int
    theta: Tensor = field(init=False)  # (S, d) float64, the current iterate
    iterations: list[int | None] = field(init=False)
    status: list[str | None] = field(init=False)
    stopped_at: int | None = field(init=False, default=None)
    curve_steps: list[int] = field(init=False)
    curve_errors: list[list[float]] = field(init=False)  # [seed][point]
    advance: Callable[[], None] = field(init=False, repr=False)  # one iteration, in place

    def __post_init__(self) -> None:
        n = self.theta0.shape[0]
        self.theta = self.theta0.clone()
        self.iterations = [None] * n
        self.status = [None] * n
        self.curve_steps = [0]
        self.curve_errors = [[1.0] for _ in range(n)]
        self._norm0 = torch.linalg.vector_norm(self.theta0, dim=1)  # (S,); θ⋆ = 0
        # Absolute thresholds, (S,); see check().
        self._threshold = self.tol * self._norm0
        self.advance = self._stepper()

    def _stepper(self) -> Callable[[], None]:
        theta, hessians = self.theta, self.hessians
        if self.method == "newton":

            def newton() -> None:
                theta.copy_(task.newton_step(hessians, theta))

            return newton
        # theta is a plain leaf tensor (requires_grad=False): the gradient is analytic, so no
        # autograd graph is ever built; torch.optim only needs .grad to be set.
        # Seeds share one tensor: a skip on one row's overflow would freeze all rows, so no guard.
        opt = guided_descent.create(self.method, [theta], on_nonfinite="off", **self.hyper)

        def first_order() -> None:
            theta.grad = task.gradient(hessians, theta)  # (S, d) float64
            opt.step()

        return first_order

    @property
    def running(self) -> bool:
        return self.stopped_at is None and any(s is None for s in self.status)

    @property
    def ended(self) -> bool:
        """Every row has ended: reached, diverged, not reached or stopped."""
        return all(s is not None for s in self.status)

    def counts(self) -> list[int | None]:
        """Per seed: iterations to ``tol``; ``budget + 1`` if missed; ``None`` if stopped early."""
        return [
            it if st == REACHED else (None if st == STOPPED else self.budget + 1)
            for it, st in zip(self.iterations, self.status, strict=True)
        ]

    def final_median(self) -> float | None:
        """Median of :meth:`counts` over seeds once every row has ended by itself, else None."""
        if self.stopped_at is not None or not self.ended:
            return None
        return float(statistics.median(self.counts()))  # type: ignore[type-var]

    def median_upper(self) -> float:
        """An upper bound on the median of :meth:`counts` over seeds (inf if none yet).

        A running row may still need any number of iterations. Once enough rows have ended for
        the median to be one of theirs it is exact: rows that end later only add larger counts.
        """
        return float(
            statistics.median(
                math.inf if st is None else c
                for st, c in zip(self.status, self.counts(), strict=True)
            )  # type: ignore[type-var]
        )

    def median_lower(self, step: int) -> float:
        """A lower bound, after ``step``, on the median of :meth:`counts` over seeds: a running
        row needs at least ``step + 1`` iterations."""
        return float(
            statistics.median(
                step + 1 if st is None else c
                for st, c in zip(self.status, self.counts(), strict=True)
            )  # type: ignore[type-var]
        )

    def check(self, step: int, record_curve: bool) -> list[int]:
        """Record rows that reached ``tol`` (or blew up) at ``step``; return those that ended."""
        err = torch.linalg.vector_norm(self.theta, dim=1)  # (S,)
        hit = err <= self._threshold
        ended: list[int] = []
        # One comparison and one sync per step; the per-row work runs only on the rare steps
        # where a row reaches. A reached row's threshold becomes -inf so it never hits again.
        if bool(hit.any()):
            for s in torch.nonzero(hit).flatten().tolist():
                self.iterations[s], self.status[s] = step, REACHED
                self._threshold[s] = -math.inf
                ended.append(s)
        # NaN never compares <= anything, so blown-up rows are looked for separately; rarely,
        # since such a row counts budget + 1 whenever it is found.
        if step % NAN_CHECK_EVERY == 0 and not bool(torch.isfinite(err).all()):
            for s in torch.nonzero(~torch.isfinite(err)).flatten().tolist():
                if self.status[s] is None:
                    self.status[s] = DIVERGED
                    ended.append(s)
        # Keep the step where a row ends, so every curve runs down to its row's tolerance.
        if record_curve or ended or not self.running:
            self.curve_steps.append(step)
            for s, e in enumerate((err / self._norm0).tolist()):
                self.curve_errors[s].append(e)
        return ended

    def finish(self) -> list[int]:
        """The budget ran out: rows still going did not reach ``tol``; return them."""
        ended = [s for s, st in enumerate(self.status) if st is None]
        for s in ended:
            finite = bool(torch.isfinite(self.theta[s]).all())
            self.status[s] = NOT_REACHED if finite else DIVERGED
        return ended

    def stop(self, step: int) -> list[int]:
        """Stopped after ``step`` because it lost its race; return the rows that were running."""
        self.stopped_at = step
        ended = [s for s, st in enumerate(self.status) if st is None]
        for s in ended:
            self.status[s] = STOPPED
        return ended


def race_bar(race: Sequence[Track]) -> float:
    """The smallest upper bound on the median of any track of the race still in it."""
    return min((t.median_upper() for t in race if t.stopped_at is None), default=math.inf)


def prune_race(race: Sequence[Track], step: int, bar: float) -> list[tuple[Track, list[int]]]:
    """Stop the tracks of one κ's learning-rate race that can no longer win, after ``step``.

    A running track whose median is bound to exceed the ``bar`` (:func:`race_bar`) can neither
    win nor tie. Returns each stopped track with the rows it cut. The track that sets the bar is
    never stopped, so the race always keeps its winner.
    """
    return [(t, t.stop(step)) for t in race if t.running and t.median_lower(step) > bar]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the setting.

    Every tensor here is tiny ((seeds, 100, 100) at most), so intra-op threads only add
    synchronisation, and on a loaded machine a batched matmul that waits on a descheduled
    OpenMP thread was measured 20-50x slower than single-threaded (0.6-1.6 ms against 37 us).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solve(
    tracks: Sequence[Track],
    budget: int,
    races: Sequence[Sequence[Track]] = (),
    on_end: Callable[[Track, list[int]], None] | None = None,
) -> None:
    """Advance every track until each row reaches ``tol``, blows up, loses its race, or the
    ``budget`` of iterations runs out; ``on_end(track, rows)`` hears about rows as they end.

    ``races`` are groups of tracks (one κ, several learning rates) of which only the best median
    matters; see :func:`prune_race`.
    """
    marks = _curve_steps(budget)
    race_of = {id(t): i for i, race in enumerate(races) for t in race}
    bars = [math.inf] * len(races)
    active = list(tracks)
    with _one_thread(), torch.no_grad():
        for step in range(1, budget + 1):
            if not active:
                break
            for tr in active:
                tr.advance()
            changed: set[int] = set()
            for tr in active:
                ended = tr.check(step, step in marks)
                if ended:
                    if on_end is not None:
                        on_end(tr, ended)
                    if id(tr) in race_of:
                        changed.add(race_of[id(tr)])
            for i in changed:
                bars[i] = race_bar(races[i])
            for i, race in enumerate(races):
                # A lower bound never exceeds step + 1 (reached rows reached by step), so nothing
                # can lose before the step count passes the bar: skip the work until then.
                if step >= bars[i]:
                    for tr, rows in prune_race(race, step, bars[i]):
                        if on_end is not None:
                            on_end(tr, rows)
            active = [tr for tr in active if tr.running]
    for tr in active:
        ended = tr.finish()
        if on_end is not None:
            on_end(tr, ended)


def _problems(config: Config, kappa: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Hessians ``(S, d, d)`` and starts ``(S, d)`` of every seed at ``kappa``."""
    probs = [task.make_problem(kappa, config.dim, seed) for seed in range(config.seeds)]
    hessians = torch.stack([p.hessian for p in probs]).to(device)
    theta0 = torch.stack([p.theta0 for p in probs]).to(device)
    return hessians, theta0


def _hyper_grid(method: str, config: Config, kappa: float) -> list[dict[str, float]]:
    if method == "newton":
        return [{}]
    if method == "adam":
        # Ascending, so that a tie in the race goes to the smaller learning rate. torch's fused
        # Adam kernel halves the cost of a step on these small tensors (37 against 71 us on
        # (3, 100) float64). It rounds differently from the default loop (1e-18 apart after a
        # few steps), and at large κ Adam's trajectory amplifies that: at κ ≈ 3162, lr 0.1 the
        # two runs were O(1) apart after 2000 steps, and medians moved by a few percent
        # (2945 against 3060). Adam's counts there carry that much round-off noise either way.
        return [{"lr": lr, "fused": True} for lr in sorted(config.adam_lrs)]
    # L = 1 and μ = 1/κ by construction of the spectrum.
    return [method_constants(method, 1.0 / kappa, 1.0)]


def _fit_slope(kappas: list[float], iterations: list[float]) -> tuple[float, float]:
    """Least-squares line through ``(log10 κ, log10 iterations)``: (slope, intercept)."""
    slope, intercept = np.polyfit(np.log10(kappas), np.log10(iterations), 1)
    return float(slope), float(intercept)


def _stats(counts: list[int]) -> dict[str, float]:
    arr = np.asarray(counts, dtype=float)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def _run_method(
    method: str,
    config: Config,
    problems: dict[float, tuple[Tensor, Tensor]],
    metrics: MetricsWriter,
    bar: Any,
) -> dict[str, Any]:
    """All κ and seeds of one method in one loop; return its part of ``summary.json``."""
    started = time.perf_counter()
    budget = config.steps
    by_kappa: dict[float, list[Track]] = {}
    for kappa in config.kappas:
        hessians, theta0 = problems[kappa]
        by_kappa[kappa] = [
            Track(method, kappa, hyper, hessians, theta0, config.tol, budget)
            for hyper in _hyper_grid(method, config, kappa)
        ]
    tracks = [t for ts in by_kappa.values() for t in ts]
    races = [ts for ts in by_kappa.values() if len(ts) > 1]

    def on_end(track: Track, rows: list[int]) -> None:
        counts = track.counts()
        for s in rows:
            metrics.write(
                event="run",
                method=method,
                kappa=track.kappa,
                seed=s,
                **track.hyper,
                iterations=counts[s],
                status=track.status[s],
                stopped_at=track.stopped_at,
            )
        bar.update(len(rows))
        if track.ended:
            metrics.write(
                event="curve",
                method=method,
                kappa=track.kappa,
                **track.hyper,
                steps=track.curve_steps,
                errors=track.curve_errors,
            )

    bar.set_postfix_str(method)
    solve(tracks, budget, races, on_end)

    out: dict[str, Any] = {
        "label": LABELS[method],
        "theory_slope": THEORY_SLOPES.get(method),
        "hyper": [],
        "iterations": [],
        "status": [],
        "median": [],
        "min": [],
        "max": [],
    }
    if method == "adam":
        out.update(lr_grid=list(config.adam_lrs), chosen_lr=[], chosen_at_grid_edge=[], grid=[])
    for kappa in config.kappas:
        candidates = by_kappa[kappa]
        # The winner has the smallest final median; stopped tracks have none (theirs is known to
        # be larger) and min() keeps the first of equal medians, i.e. the smaller learning rate.
        finished = [t for t in candidates if t.stopped_at is None]
        best = min(finished, key=lambda t: t.final_median() or math.inf)
        counts = [int(c) for c in best.counts() if c is not None]
        out["hyper"].append(best.hyper)
        out["iterations"].append(counts)
        out["status"].append(list(best.status))
        for key, value in _stats(counts).items():
            out[key].append(value)
        if method == "adam":
            lr = best.hyper["lr"]
            out["chosen_lr"].append(lr)
            out["chosen_at_grid_edge"].append(lr in (min(config.adam_lrs), max(config.adam_lrs)))
            out["grid"].append(
                [
                    {
                        "lr": t.hyper["lr"],
                        "iterations": t.counts(),
                        "status": list(t.status),
                        "median": t.final_median(),
                        "stopped_at": t.stopped_at,
                    }
                    for t in candidates
                ]
            )
    out["slope"], out["intercept"] = _fit_slope(list(config.kappas), out["median"])
    out["unreached"] = sum(st != REACHED for row in out["status"] for st in row)
    out["seconds"] = time.perf_counter() - started
    return out


def _censored(method: dict[str, Any]) -> Outcome | None:
    """A slope fit to iteration counts of runs that never reached the tolerance (each counted
    as ``budget + 1``, a lower bound) is not a measurement: UNDECIDED."""
    missed = method.get("unreached", 0)
    if not missed:
        return None
    return Outcome.undecided(
        f"{missed} run(s) did not reach the tolerance within the budget: the slope would be fit "
        "to censored counts (raise --steps)"
    )


def claims(methods: dict[str, dict[str, Any]]) -> list[Claim]:
    """The protocol's claims for the methods that were run (a claim on a method not run is left
    out rather than failed)."""
    out: list[Claim] = []
    if "sgd" in methods:
        out.append(
            Claim(
                name="gd_slope",
                statement=(
                    "GD with η = 1/L: the log-log slope of median iterations vs κ is 1 ± 0.1 "
                    "(iterations ∝ κ)"
                ),
                value=methods["sgd"]["slope"],
                op="within",
                threshold=list(GD_SLOPE_RANGE),
                outcome=_censored(methods["sgd"]),
            )
        )
    if "momentum" in methods:
        out.append(
            Claim(
                name="heavy_ball_slope",
                statement=(
                    "heavy ball with its optimal constants: the log-log slope of median "
                    "iterations vs κ is 0.5 ± 0.1 (iterations ∝ √κ)"
                ),
                value=methods["momentum"]["slope"],
                op="within",
                threshold=list(HEAVY_BALL_SLOPE_RANGE),
                outcome=_censored(methods["momentum"]),
            )
        )
    if "newton" in methods:
        worst = max(c for row in methods["newton"]["iterations"] for c in row)
        out.append(
            Claim(
                name="newton_one_step",
                statement=(
                    "Newton reaches the tolerance in one step at every κ and seed "
                    "(value: the most iterations any run took)"
                ),
                value=float(worst),
                op="<=",
                threshold=float(NEWTON_MAX_STEPS),
            )
        )
    return out


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Every method x κ x seed to tolerance, then the summary with slopes and claims."""
    device = torch.device(config.device)
    started = time.perf_counter()
    problems = {kappa: _problems(config, kappa, device) for kappa in config.kappas}
    runs_per_kappa = {m: len(_hyper_grid(m, config, config.kappas[0])) for m in config.optimizers}
    total = sum(runs_per_kappa.values()) * len(config.kappas) * config.seeds
    methods: dict[str, dict[str, Any]] = {}
    with run.metrics() as metrics, progress.bar(total, "quadratic", unit="run") as bar:
        for method in config.optimizers:
            methods[method] = _run_method(method, config, problems, metrics, bar)
    results: dict[str, Any] = {
        "kappas": list(config.kappas),
        "dim": config.dim,
        "tol": config.tol,
        "seeds": config.seeds,
        "budget": config.steps,
        "methods": methods,
        "slopes": {m: r["slope"] for m, r in methods.items()},
        "adam_defaults": {k: v for k, v in get_spec("adam").defaults.items() if k != "lr"},
        "torch_threads": 1,
        "wall_seconds": time.perf_counter() - started,
    }
    run.write_summary(results, require_seeds(claims(methods), config.seeds))
