"""``linear-representation``: who learns the subspace under anisotropic inputs (EXPERIMENTS.md §1).

A two-layer linear model ``f(x) = F G x`` is fit to ``y = F⋆ G⋆ x + ε`` with inputs of covariance
``Σ_x`` (condition number ``κ_x``) and a head ``F⋆`` of condition number ``√κ_F``; the metric is
the subspace distance between the learned ``G`` and ``G⋆`` (the task module,
:mod:`guided_descent.tasks.linear_representation`, has the data, the update rules and the metric).

Methods (``Config.optimizers``):

* ``layerwise`` -- the paper's alternating sweep: a G-step preconditioned on both sides,
  ``(FᵀF + λI)⁻¹ ∇_G L (Σ̂_x + λI)⁻¹`` with ``η_G``, then on a fresh batch an F-step
  ``∇_F L Σ̂_z⁻¹`` with ``η_F``; ``F₀ = 0``. One sweep counts as one step (it draws two batches).
* ``layerwise_one_sided`` -- the same with ``I`` in place of ``FᵀF`` (input side only).
* ``gauss_newton`` -- the full damped Gauss–Newton step on ``(F, G)`` jointly, step size 1,
  damping ``μ`` from ``gn_dampings`` (relative to the mean eigenvalue of the GN matrix);
  ``F₀ = 0`` like the layer-wise rule, so the two second-order methods differ only in the update.
* ``sgd``, ``adam`` -- the registry's ``torch.optim`` optimizers on ``(F, G)``, closed-form
  gradients; ``F₀ ~ N(0, 1/k)``.
* ``kfac``, ``shampoo``, ``soap``, ``muon`` -- the library's general-purpose optimizers on an
  ``nn.Sequential(Linear(d_X, k), Linear(k, d_Y))`` without biases, one model per seed; settings in
  :data:`LIBRARY_SETTINGS` (why each is set is written there).

Hyper-parameter selection (the rule was fixed before any run; the grid ranges were set after a
short pilot so that each brackets its method's usable range, from too slow to unstable): every
tuned method runs its grid on every ``(κ_x, κ_F)`` cell, and the cell's winner is the grid value
with the smallest median over seeds of steps-to-0.1 (the first step with distance <= 0.1; a seed
that never gets there, or blows up before, counts ``steps + 1``); ties go to the smaller median
final distance (a blown-up seed counts 1, the largest possible), then to the earlier grid value.
Each method is thus as fast as its grid allows in each cell, which makes statements of the form
"method X is slow" conservative. The grid runs as a race (:func:`prune_race`): a value whose
median can no longer match the best one is stopped early, which selects the same winner.

Execution: all runs of one cell advance in lockstep and see the same data: at step ``t`` every
seed draws one batch that every method uses, plus a second batch for the layer-wise F-step. The
hand-written methods, SGD and Adam stack the seeds along a leading dimension (every operation is
batched, and the rows are independent runs); the library optimizers, which treat a 3-D tensor
differently from a matrix, get one model per seed. Distances of all runs are computed in one
batched call per step, so ``steps-to-0.1`` is exact to the step.

Modules: this one holds the configuration, the per-cell results (winners, transfer task, the ALS
check) and the run; ``linear_representation_runs`` the cells, the methods' updates and the
lockstep race; ``linear_representation_claims`` the protocol's claims and how censored step
counts decide them.

Records: ``metrics.jsonl`` gets a ``step`` record per run and logged step (distance and excess
population loss per seed) and a ``run`` record per run at the end; ``summary.json`` the per-cell
results of every grid value, the winners, the transfer task and the claims.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.linear_representation_claims import (
    CLAIM_KF_HARD,
    CLAIM_KX_HIGH,
    CLAIM_KX_LOW,
    SEED_FREE,
    claims,
    gauss_newton_verdicts,
)
from guided_descent.experiments.linear_representation_runs import (
    _DATA,
    _INIT,
    _PROBLEM,
    _TRANSFER_DATA,
    _TRANSFER_TASK,
    DIVERGED,
    DIVERGED_NORM,
    FIRST_ORDER,
    HAND_WRITTEN,
    LIBRARY,
    LIBRARY_SETTINGS,
    METHODS,
    NOT_REACHED,
    REACHED,
    STOPPED,
    TARGET_DIST,
    Batches,
    Cell,
    Run,
    _generator,
    _median,
    _plain,
    cell_key,
    make_cell,
    make_run,
    prune_race,
    run_cell,
)
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import RunDir, require_seeds
from guided_descent.tasks import linear_representation as task

LABELS: dict[str, str] = {
    "layerwise": "layer-wise precond. (paper)",
    "layerwise_one_sided": "layer-wise, input side only",
    "gauss_newton": "full Gauss–Newton",
    "sgd": "SGD",
    "adam": "Adam",
    "kfac": "K-FAC (library)",
    "shampoo": "Shampoo (library)",
    "soap": "SOAP (library)",
    "muon": "Muon (library)",
}

# Which Config field holds each tuned method's grid, and what the grid values are.
GRID_FIELD: dict[str, str] = {
    "gauss_newton": "gn_dampings",
    "sgd": "sgd_lrs",
    "adam": "adam_lrs",
    "kfac": "kfac_lrs",
    "shampoo": "shampoo_lrs",
    "soap": "soap_lrs",
    "muon": "muon_lrs",
}
HYPER_NAME: dict[str, str] = {m: ("damping" if m == "gauss_newton" else "lr") for m in GRID_FIELD}

# How the default grids came to be, saved with every run and printed in its report.
GRID_HISTORY = (
    "The selection rule was fixed before any run. The grid ranges were set after a short pilot "
    "(2-5 seeds, 200-3000 steps) so that each spans its method's usable range, from too slow "
    "to unstable. The first full run then found Shampoo's winner at the top of its grid (0.1) "
    "in 7 of 8 cells, SOAP's at the bottom (0.01) in 2 and Gauss-Newton's at the bottom (1e-6) "
    "in 5; those grids were extended by one value each (Shampoo 0.316, SOAP 0.00316, "
    "Gauss-Newton 1e-8) and the run repeated. No claim involves Shampoo or SOAP, and a wider "
    "Gauss-Newton grid can only make Gauss-Newton faster, i.e. claim 4 harder to pass."
)




def _half_decades(lo_exp: float, hi_exp: float) -> tuple[float, ...]:
    """``10^lo, 10^(lo+1/2), ..., 10^hi`` to 3 significant digits (exponents in steps of 1/2)."""
    return tuple(
        float(f"{10.0 ** (k / 2):.3g}") for k in range(round(2 * lo_exp), round(2 * hi_exp) + 1)
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """SGD, Adam, the layer-wise preconditioned sweep, Gauss–Newton and the library's matrix
    optimizers learning a linear representation under ill-conditioned inputs."""

    optimizers: tuple[str, ...] = option(
        METHODS,
        "methods: layerwise, layerwise_one_sided, gauss_newton (hand-written), sgd, adam, kfac, "
        "shampoo, soap, muon (the library's)",
    )
    seeds: int = option(
        5, "number of seeds (0, 1, ..., N-1); a seed fixes Q, G*, F*'s bases, inits"
    )
    steps: int = option(
        1000, "steps per run (one layer-wise sweep, a G-step then an F-step, is one step)"
    )
    kappa_x: tuple[float, ...] = option(
        (1.0, 10.0, 100.0, 1000.0), "condition numbers of the input covariance"
    )
    kappa_f: tuple[float, ...] = option((1.0, 10.0), "condition numbers of F*ᵀF* (the head)")
    d_x: int = option(100, "input dimension d_X")
    k: int = option(8, "representation dimension k")
    d_y: int = option(20, "output dimension d_Y")
    batch_size: int = option(256, "fresh samples per batch")
    noise: float = option(0.01, "standard deviation sigma of the label noise")
    rotated: bool = option(True, "Haar-rotated input covariance (else axis-aligned)")
    eta_g: float = option(0.5, "layer-wise rule: step size of the G-step")
    eta_f: float = option(1.0, "layer-wise rule: step size of the F-step")
    damping: float = option(
        1e-6, "layer-wise rule: damping of each factor, relative to its mean eigenvalue"
    )
    gn_dampings: tuple[float, ...] = option(
        (1e-8, 1e-6, 1e-4, 1e-2, 1e-1),
        "Gauss-Newton dampings, relative to the GN matrix's mean eigenvalue (best per cell)",
    )
    sgd_lrs: tuple[float, ...] = option(_half_decades(-2, 0), "SGD learning-rate grid")
    adam_lrs: tuple[float, ...] = option(_half_decades(-3, -0.5), "Adam learning-rate grid")
    kfac_lrs: tuple[float, ...] = option(_half_decades(-1, 0), "K-FAC learning-rate grid")
    shampoo_lrs: tuple[float, ...] = option(_half_decades(-2, -0.5), "Shampoo learning-rate grid")
    soap_lrs: tuple[float, ...] = option(_half_decades(-2.5, -1), "SOAP learning-rate grid")
    muon_lrs: tuple[float, ...] = option(_half_decades(-2, -1), "Muon learning-rate grid")
    compare_at: int = option(
        200, "step at which claims 2-3 compare distances and the transfer task takes G"
    )
    transfer_samples: int = option(
        32, "transfer task: samples for the least-squares head (n = 4k by default)"
    )
    transfer_draws: int = option(10, "transfer task: training sets averaged per seed")
    log_every: int = option(10, "write distances to metrics.jsonl every N steps (and steps <= 20)")
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        for name in self.optimizers:
            if name not in METHODS:
                raise ValueError(
                    f"unknown method {name!r} for linear-representation; accepted: "
                    f"{', '.join(METHODS)}"
                )
        super().__post_init__()
        for name in ("kappa_x", "kappa_f"):
            values = getattr(self, name)
            if not values or not all(_is_real(v) and v >= 1 for v in values):
                raise ValueError(f"{name} must be finite numbers >= 1, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values!r}")
        for name in ("d_x", "k", "d_y", "batch_size", "transfer_draws", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.d_x < 2:
            raise ValueError(f"d_x must be an integer >= 2, got {self.d_x!r}")
        if self.k > min(self.d_x, self.d_y):
            raise ValueError(
                f"k must be <= min(d_x, d_y) = {min(self.d_x, self.d_y)}, got {self.k}"
            )
        if not _is_int(self.transfer_samples) or self.transfer_samples < self.k:
            raise ValueError(
                f"transfer_samples must be an integer >= k = {self.k}, got "
                f"{self.transfer_samples!r}"
            )
        if not _is_int(self.compare_at) or not 1 <= self.compare_at <= self.steps:
            raise ValueError(
                f"compare_at must be an integer in [1, steps = {self.steps}], got "
                f"{self.compare_at!r}"
            )
        if not _is_real(self.noise) or self.noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")
        for name in ("eta_g", "eta_f"):
            if not _is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not _is_real(self.damping) or self.damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        for method, name in GRID_FIELD.items():
            grid = getattr(self, name)
            if method in self.optimizers and not grid:
                raise ValueError(f"{name} must hold at least one value when {method} is run")
            if not all(_is_real(v) and v > 0 for v in grid):
                raise ValueError(f"{name} must be finite numbers > 0, got {grid!r}")
            if len(set(grid)) != len(grid):
                raise ValueError(f"{name} lists a value twice: {grid!r}")

    @classmethod
    def quick(cls) -> Self:
        """2 seeds, cells (1, 10) and (100, 10), 300 steps, one or two grid values per method."""
        return cls(
            seeds=2,
            steps=300,
            kappa_x=(1.0, 100.0),
            kappa_f=(10.0,),
            gn_dampings=(1e-6, 1e-2),
            sgd_lrs=(0.1, 0.316),
            adam_lrs=(0.0316, 0.1),
            kfac_lrs=(0.316,),
            shampoo_lrs=(0.1,),
            soap_lrs=(0.0316,),
            muon_lrs=(0.0316,),
            transfer_draws=4,
        )

    @classmethod
    def flagship(cls) -> Self:
        """The flagship's "when AdamW is not enough" comparison, seconds on 2 cores: the paper's
        hard cell (κ_x = 100, κ_F = 10) beside the isotropic one (κ_x = 1), the protocol's 5
        seeds, 200 steps; SGD and Adam each at the best of three learning rates, the paper's
        layer-wise rule, and the library's K-FAC (which carries the same factors) at the better
        of two."""
        return cls(
            optimizers=("sgd", "adam", "layerwise", "kfac"),
            seeds=5,
            steps=200,
            kappa_x=(1.0, 100.0),
            kappa_f=(10.0,),
            sgd_lrs=(0.1, 0.316, 1.0),
            adam_lrs=(0.01, 0.0316, 0.1),
            kfac_lrs=(0.316, 1.0),
            transfer_draws=4,
        )

    def grid(self, method: str) -> tuple[float | None, ...]:
        """The hyper-parameter values ``method`` runs (``(None,)`` for the untuned rules)."""
        name = GRID_FIELD.get(method)
        return (None,) if name is None else tuple(getattr(self, name))

    @property
    def cells(self) -> list[tuple[float, float]]:
        """Every ``(κ_x, κ_F)`` in the order they run."""
        return [(kx, kf) for kf in self.kappa_f for kx in self.kappa_x]


# ------------------------------------------------------------------------------ the results


def run_result(r: Run, budget: int) -> dict[str, Any]:
    """A run's numbers for ``summary.json`` and ``metrics.jsonl``.

    Per seed: ``steps`` to 0.1 (``budget + 1`` if missed or blown up first; ``None`` if the race
    stopped the run before the seed got there), ``status`` (reached / not reached / diverged /
    stopped), ``diverged_at`` (a seed can reach and blow up later), and the distances at
    ``compare_at`` and at the end (``None`` for a blown-up seed). Medians count a blown-up seed's
    distance as 1, the metric's largest value. A stopped run has no medians.
    """
    counts = r.counts(budget)
    stopped = r.stopped_at is not None
    status = []
    for at, dv in zip(r.reached_at, r.diverged_at, strict=True):
        if at is not None:
            status.append(REACHED)
        elif dv is not None:
            status.append(DIVERGED)
        else:
            status.append(STOPPED if stopped else NOT_REACHED)
    steps = [c if c is not None else (None if stopped else float(budget + 1)) for c in counts]
    final = None if stopped or r.last_dist is None else _plain(r.last_dist, r.alive)
    compare = r.dist_compare

    def med(values: list[float | None] | None) -> float | None:
        return None if values is None else _median([1.0 if v is None else v for v in values])

    return {
        "hyper": r.hyper,
        "steps": [None if v is None else int(v) for v in steps],
        "status": status,
        "diverged_at": list(r.diverged_at),
        "stopped_at": r.stopped_at,
        "final_dist": final,
        "dist_compare": compare,
        "median_steps": None if stopped else _median([float(v) for v in steps]),  # type: ignore[arg-type]
        "median_final_dist": med(final),
        "median_dist_compare": med(compare),
        "library_warnings": r.warnings,
    }


def select(entries: Sequence[Mapping[str, Any]]) -> int:
    """Index of the winning grid value: smallest median steps-to-0.1, then smallest median final
    distance, then the earliest grid value (the rule in the module docstring). Runs stopped by
    their race (no median) cannot win: they were stopped for being slower than another."""
    finished = [i for i, e in enumerate(entries) if e["median_steps"] is not None]
    return min(
        finished,
        key=lambda i: (entries[i]["median_steps"], entries[i]["median_final_dist"], i),
    )


def transfer(
    config: Config, cell: Cell, g: Tensor | None, dist: Sequence[float | None] | None
) -> tuple[list[float | None], list[float | None]]:
    """Per seed: the excess risk of the frozen ``g`` on the seed's transfer task, and the oracle's
    risk. Every method is scored on the same tasks and the same training sets. ``dist`` is the
    run's distance at the moment ``g`` was taken; seeds without one (blown up, or no ``g``) get
    ``None``."""
    if g is None or dist is None:
        return [None] * cell.seeds, [None] * cell.seeds
    alive = [d is not None for d in dist]
    device = g.device
    tasks = [
        task.make_transfer_task(p, _generator(s, _TRANSFER_TASK), rotated=config.rotated)
        for s, p in enumerate(cell.problems)
    ]
    stacked = task.TransferTask(
        torch.stack([t.sigma_x for t in tasks]).to(device),
        torch.stack([t.sigma_x_sqrt for t in tasks]).to(device),
        torch.stack([t.target for t in tasks]).to(device),
    )
    generators = [_generator(s, _TRANSFER_DATA, device) for s in range(cell.seeds)]
    # Blown-up seeds were reset to their init, so g is finite; their numbers are dropped.
    excess, oracle = task.transfer_excess_risk(
        g,
        cell.g_star,
        stacked,
        config.transfer_samples,
        config.noise,
        config.transfer_draws,
        generators,
    )
    return _plain(excess, alive), oracle.tolist()  # type: ignore[return-value]


def als_check(config: Config, device: torch.device) -> float:
    """Claim 5 on the run's own problem size: the relative difference between one layer-wise
    sweep with ``η_G = η_F = 1``, ``P_G = FᵀF``, ``λ = 0`` and full-batch statistics, and one
    sweep of alternating least squares (:func:`task.als_sweep`), on ``2 d_X`` samples of seed 0
    at the largest ``κ_x``. Returns the larger of the two relative errors (``F`` and ``G``)."""
    problem = task.make_problem(
        config.d_x,
        config.k,
        config.d_y,
        max(config.kappa_x),
        max(config.kappa_f),
        _generator(0, _PROBLEM),
        rotated=config.rotated,
    )
    gen = _generator(0, _INIT)
    g0 = task.init_first_layer(config.k, config.d_x, gen).to(device)
    f0 = task.init_head(config.d_y, config.k, gen).to(device)
    x, y = task.sample(
        problem.sigma_x_sqrt[None].to(device),
        problem.target[None].to(device),
        config.noise,
        2 * config.d_x,
        [_generator(0, _DATA, device)],
    )
    x, y = x[0], y[0]
    g1 = task.layerwise_g_step(f0, g0, x, y, lr=1.0, damping=0.0)
    f1 = task.layerwise_f_step(f0, g1, x, y, lr=1.0, damping=0.0)
    f_ref, g_ref = task.als_sweep(f0, g0, x, y)
    err_g = torch.linalg.matrix_norm(g1 - g_ref) / torch.linalg.matrix_norm(g_ref)
    err_f = torch.linalg.matrix_norm(f1 - f_ref) / torch.linalg.matrix_norm(f_ref)
    return float(torch.maximum(err_g, err_f))


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Every method x grid value x cell x seed, then the winners, the transfer task, the claims."""
    device = torch.device(config.device)
    started = time.perf_counter()
    methods = list(config.optimizers)
    results: dict[str, Any] = {
        "cells": [{"kappa_x": kx, "kappa_f": kf} for kx, kf in config.cells],
        "methods": {
            m: {
                "label": LABELS[m],
                "hyper_name": HYPER_NAME.get(m),
                "grid": list(config.grid(m)) if m in GRID_FIELD else None,
                "settings": LIBRARY_SETTINGS.get(m),
                "cells": {},
            }
            for m in methods
        },
    }
    total = len(config.cells) * config.steps
    with run.metrics() as metrics, progress.bar(total, "linear-representation") as bar:
        for kappa_x, kappa_f in config.cells:
            bar.set_postfix_str(f"kappa_x={kappa_x:g} kappa_f={kappa_f:g}")
            cell = make_cell(config, kappa_x, kappa_f, device)
            runs = [make_run(m, h, cell, config) for m in methods for h in config.grid(m)]
            with torch.no_grad():
                run_cell(config, cell, runs, metrics, bar)
            key = cell_key(kappa_x, kappa_f)
            for m in methods:
                mine = [r for r in runs if r.method == m]
                entries = [run_result(r, config.steps) for r in mine]
                for entry in entries:
                    metrics.write(event="run", kappa_x=kappa_x, kappa_f=kappa_f, method=m, **entry)
                best = select(entries)
                winner = mine[best]
                chosen = dict(entries[best])
                with torch.no_grad():
                    chosen["transfer_excess"], chosen["transfer_oracle"] = transfer(
                        config, cell, winner.g_compare, winner.dist_compare
                    )
                    chosen["transfer_excess_final"], _ = transfer(
                        config, cell, winner.weights()[1], chosen["final_dist"]
                    )
                grid = config.grid(m)
                chosen["at_grid_edge"] = len(grid) > 1 and best in (0, len(grid) - 1)
                chosen["grid"] = entries
                results["methods"][m]["cells"][key] = chosen
    if "gauss_newton" in methods and "layerwise" in methods:
        results["gauss_newton_verdicts"] = gauss_newton_verdicts(results, config.damping)
    with torch.no_grad():
        results["als_relative_error"] = als_check(config, device)
    results.update(
        grid_history=GRID_HISTORY,
        steps=config.steps,
        seeds=config.seeds,
        compare_at=config.compare_at,
        target=TARGET_DIST,
        torch_threads=torch.get_num_threads(),
        wall_seconds=time.perf_counter() - started,
    )
    run.write_summary(results, require_seeds(claims(results), config.seeds, exempt=SEED_FREE))


__all__ = [
    "CLAIM_KF_HARD",
    "CLAIM_KX_HIGH",
    "CLAIM_KX_LOW",
    "DIVERGED",
    "DIVERGED_NORM",
    "FIRST_ORDER",
    "HAND_WRITTEN",
    "LABELS",
    "LIBRARY",
    "LIBRARY_SETTINGS",
    "METHODS",
    "NOT_REACHED",
    "REACHED",
    "STOPPED",
    "TARGET_DIST",
    "Batches",
    "Cell",
    "Config",
    "Run",
    "als_check",
    "cell_key",
    "claims",
    "gauss_newton_verdicts",
    "make_cell",
    "make_run",
    "prune_race",
    "run",
    "run_cell",
    "run_result",
    "select",
    "transfer",
]
