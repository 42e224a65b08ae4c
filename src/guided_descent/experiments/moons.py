"""``moons``: six optimizers on a small and a very wide network (EXPERIMENTS.md section 3).

The lecture trains SGD, SGD+momentum, SGD+Nesterov, Adam, AdamW and Lion on a 2-D binary
classification problem with a one-hidden-layer network of width 32 ("small") and 8192 ("lazy"),
and reports a table of losses and accuracies. It states neither the data, the learning rates nor
the budget, so this module fixes them (the protocol): two moons with noise 0.3, an 80/20 split,
the registry's default hyper-parameters, 1000 steps at batch 64, several seeds.

For every (optimizer, width, seed) the run logs the loss curve to ``metrics.jsonl``, keeps the
final losses and accuracies, the first layer's relative movement (the "lazy training" signature:
a wide network fits the data while its weights hardly move) and the boundary smoothness. Seed 0's
decision boundaries go to ``boundaries.npz`` for the figure. ``summary.json`` holds the per-cell
statistics, the claims and the comparison with the lecture's table.

Pairing: within one seed every optimizer and width sees the same data, split and batch order, and
every optimizer at one width starts from the same weights, so differences between optimizers are
not differences in luck.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

import guided_descent
from guided_descent.experiments.config import ExperimentConfig, option
from guided_descent.experiments.progress import Progress
from guided_descent.experiments.records import (
    Claim,
    MetricsWriter,
    Outcome,
    RunDir,
    require_seeds,
    write_atomic,
)
from guided_descent.experiments.training import train
from guided_descent.optimizers import get_spec
from guided_descent.tasks import moons as task

BOUNDARIES = "boundaries.npz"

# The lecture's table, "Optimizer Comparison: Numerical Results", in
# /work/shared/seeds/004_251d601461b7a59c.txt (Computational Mathematics and AI, Lecture 5:
# Efficient Optimization Methods, "Numerical Comparison"). Per optimizer and regime:
# (train loss, test loss, train accuracy, test accuracy); accuracies converted from % to fractions.
LECTURE_WIDTHS: dict[str, int] = {"small": 32, "lazy": 8192}
LECTURE_TABLE: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "sgd": {"small": (0.51, 0.50, 0.829, 0.825), "lazy": (0.24, 0.42, 0.916, 0.860)},
    "momentum": {"small": (0.41, 0.48, 0.856, 0.795), "lazy": (0.58, 0.84, 0.836, 0.855)},
    "nesterov": {"small": (0.89, 1.04, 0.683, 0.635), "lazy": (0.24, 0.29, 0.909, 0.895)},
    "adam": {"small": (0.21, 0.44, 0.929, 0.900), "lazy": (0.08, 0.29, 0.972, 0.915)},
    "adamw": {"small": (0.13, 0.29, 0.950, 0.920), "lazy": (0.24, 0.36, 0.902, 0.865)},
    "lion": {"small": (0.41, 0.70, 0.856, 0.815), "lazy": (0.34, 0.41, 0.914, 0.850)},
}
# The lecture's row labels, for the report.
LECTURE_NAMES: dict[str, str] = {
    "sgd": "SGD",
    "momentum": "SGD+Momentum",
    "nesterov": "SGD+Nesterov",
    "adam": "Adam",
    "adamw": "AdamW",
    "lion": "Lion",
}
# The column order of LECTURE_TABLE's tuples, and of every per-cell table.
TABLE_METRICS: tuple[str, ...] = ("train_loss", "test_loss", "train_acc", "test_acc")
# Everything recorded per (optimizer, width, seed) at the end of training.
FINAL_METRICS: tuple[str, ...] = (*TABLE_METRICS, "movement", "smoothness", "seconds")

# Thresholds of the claims, fixed by EXPERIMENTS.md section 3 before any run.
SGD_MOVEMENT_FACTOR = 4.0
LAZY_TEST_ACCURACY = 0.85


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """Six optimizers x a small and a wide one-hidden-layer ReLU network on two moons."""

    optimizers: tuple[str, ...] = option(
        ("sgd", "momentum", "nesterov", "adam", "adamw", "lion"),
        "optimizers to compare, with the registry's default hyper-parameters",
    )
    widths: tuple[int, ...] = option(
        (32, 8192),
        "hidden widths; the smallest stands for the lecture's 'small' regime, the largest 'lazy'",
    )
    seeds: int = option(5, "number of seeds (0, 1, ..., N-1); each draws its own data set")
    steps: int = option(1000, "optimizer steps per run")
    batch_size: int = option(64, "minibatch size")
    n_samples: int = option(1000, "points drawn by make_moons, split 80/20 into train and test")
    noise: float = option(0.3, "standard deviation of make_moons' Gaussian noise")
    mesh_resolution: int = option(
        100, "points per axis of the grid for decision boundaries and smoothness"
    )
    eval_every: int = option(50, "log full train/test loss and accuracy every N steps")
    device: str = option("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.optimizers:
            # get_spec raises an UnknownNameError (a ValueError) that lists the known names.
            if get_spec(name).needs_model:
                raise ValueError(
                    f"optimizer {name!r} needs the model's layers; moons runs only optimizers "
                    "that take a parameter list"
                )
        if not self.widths or not all(_is_int(w) and w >= 1 for w in self.widths):
            raise ValueError(f"widths must be integers >= 1, got {self.widths!r}")
        if len(set(self.widths)) < 2:
            raise ValueError(
                f"widths must hold at least two different widths (small and wide), got "
                f"{self.widths!r}"
            )
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths lists a width twice: {self.widths!r}")
        if not _is_int(self.n_samples) or self.n_samples < 10:
            raise ValueError(f"n_samples must be an integer >= 10, got {self.n_samples!r}")
        n_train = self.n_samples - round(0.2 * self.n_samples)
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= n_train:
            raise ValueError(
                f"batch_size must be an integer in [1, {n_train}] (the training set), got "
                f"{self.batch_size!r}"
            )
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, (int, float))
            or not math.isfinite(self.noise)
            or self.noise < 0
        ):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")
        if not _is_int(self.mesh_resolution) or self.mesh_resolution < 2:
            raise ValueError(
                f"mesh_resolution must be an integer >= 2, got {self.mesh_resolution!r}"
            )
        if not _is_int(self.eval_every) or self.eval_every < 1:
            raise ValueError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")

    @classmethod
    def quick(cls) -> Self:
        """2 seeds, 300 steps, widths 32 and 2048, a coarser mesh: a few seconds on 2 cores."""
        return cls(seeds=2, steps=300, widths=(32, 2048), mesh_resolution=60)

    @property
    def small(self) -> int:
        return min(self.widths)

    @property
    def wide(self) -> int:
        return max(self.widths)


def _stream_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per (seed, purpose), so init and batch order never share draws."""
    entropy = [seed, *stream.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


# `guided-descent run --resume` continues a moons run from its finished units.
RESUMABLE = True

# A unit of work: one training run, identified by these fields of its "final" record.
UNIT = ("optimizer", "width", "seed")
PARTIAL = "partial"  # per-unit boundary arrays kept until boundaries.npz is written


def _unit(record: dict[str, Any]) -> tuple:
    return tuple(record.get(f) for f in UNIT)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _train_one(
    config: Config,
    data: task.MoonsData,
    optimizer: str,
    width: int,
    seed: int,
    batches: torch.Tensor,
    grid: tuple[torch.Tensor, torch.Tensor],
    metrics: MetricsWriter,
    boundary_file: Path | None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Train one network; return its final numbers and, if asked, ``p(class 1)`` on the grid.

    With ``boundary_file``, ``p(class 1)`` is also saved there -- before the unit's "final"
    record is written, so a resumed run never finds a finished unit without its boundary.
    """
    device = torch.device(config.device)
    start = time.perf_counter()
    # Same seed and width -> same initial weights for every optimizer (paired comparison).
    init = torch.Generator().manual_seed(_stream_seed(seed, f"init-{width}"))
    model = task.make_mlp(width, init, device)
    w0 = task.first_layer_weight(model).detach().clone()
    # The experiment reports divergence as NaN, so the non-finite guard stays off.
    opt = guided_descent.create(optimizer, model, on_nonfinite="off")
    tag = dict(optimizer=optimizer, width=width, seed=seed)

    def evaluate() -> dict[str, float]:
        """Loss and accuracy on the whole train and test splits."""
        scores: dict[str, float] = {}
        scores["train_loss"], scores["train_acc"] = task.evaluate(model, data.x_train, data.y_train)
        scores["test_loss"], scores["test_acc"] = task.evaluate(model, data.x_test, data.y_test)
        return scores

    def batch_loss(step: int) -> torch.Tensor:
        idx = batches[step - 1]
        return task.loss_fn(model(data.x_train[idx]), data.y_train[idx])

    result = train(
        model,
        opt,
        batch_loss,
        config.steps,
        evaluate=evaluate,
        eval_every=config.eval_every,
        metrics=metrics,
        tags=tag,
    )
    final = dict(result.scores)  # the evaluation after the last step
    final["movement"] = task.relative_movement(task.first_layer_weight(model).detach(), w0)
    final["smoothness"] = task.boundary_smoothness(model, *grid)
    boundary = None
    if boundary_file is not None:
        boundary = task.mesh_probability(model, *grid).numpy()
        buf = io.BytesIO()
        np.save(buf, boundary)
        write_atomic(boundary_file, buf.getvalue())
    final["seconds"] = time.perf_counter() - start
    metrics.write(event="final", **tag, step=config.steps, **final)
    return final, boundary


# Hyper-parameters worth printing in the report, under torch's names.
_HYPERPARAMS = ("lr", "momentum", "nesterov", "betas", "eps", "weight_decay")


def _hyperparams(name: str) -> dict[str, Any]:
    """The hyper-parameters ``create(name, ...)`` actually fills in (registry and torch defaults).

    Read from a throwaway optimizer over one zero tensor, so that the record shows what ran even
    if the registry's defaults change later.
    """
    group = guided_descent.create(name, [torch.zeros(1, requires_grad=True)]).param_groups[0]
    return {k: group[k] for k in _HYPERPARAMS if k in group}


def _stats(values: list[float]) -> dict[str, Any]:
    """Median, min and max over seeds, and the values themselves (seed order).

    A diverged run (NaN) makes all three NaN: a failed seed must not be hidden by the others.
    """
    arr = np.asarray(values, dtype=float)
    if np.isnan(arr).any():
        nan = float("nan")
        return {"median": nan, "min": nan, "max": nan, "per_seed": list(values)}
    return {
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "per_seed": [float(v) for v in arr],
    }


def run(config: Config, run: RunDir, progress: Progress) -> None:
    """Train every (optimizer, width, seed), then write boundaries, summary and claims."""
    device = torch.device(config.device)
    per_seed: dict[str, dict[int, dict[str, list[float]]]] = {
        o: {w: {m: [] for m in FINAL_METRICS} for w in config.widths} for o in config.optimizers
    }
    boundaries: dict[str, np.ndarray] = {}
    total = len(config.optimizers) * len(config.widths) * config.seeds
    started = time.perf_counter()
    # Resuming: units that finished before an interruption are read back, not retrained (each
    # unit is seeded on its own, so the result is the same as an uninterrupted run); the partial
    # records of the unit that was cut off are dropped, as it runs again.
    done = run.finished_units(UNIT)
    if done:
        run.keep_metrics(lambda r: "optimizer" not in r or _unit(r) in done)
    partial = run.file(PARTIAL)
    partial.mkdir(exist_ok=True)
    with run.metrics() as metrics, progress.bar(total, "moons", unit="run") as bar:
        for seed in range(config.seeds):
            data = task.make_data(config.n_samples, config.noise, seed)
            points = torch.cat([data.x_train, data.x_test])
            grid = task.mesh(points, config.mesh_resolution)
            if seed == 0:
                boundaries.update(
                    xs=grid[0].numpy(),
                    ys=grid[1].numpy(),
                    x_train=data.x_train.numpy(),
                    y_train=data.y_train.numpy(),
                    x_test=data.x_test.numpy(),
                    y_test=data.y_test.numpy(),
                )
            # One batch order per seed, shared by every optimizer and width.
            order = torch.Generator().manual_seed(_stream_seed(seed, "batches"))
            batches = task.batch_indices(
                data.x_train.shape[0], config.batch_size, config.steps, order
            ).to(device)
            data = data.to(device)
            for width in config.widths:
                for name in config.optimizers:
                    bar.set_postfix_str(f"{name} w={width} seed={seed}")
                    saved = partial / f"boundary-{name}-{width}.npy"
                    if (name, width, seed) in done:
                        record = done[(name, width, seed)]
                        # JSON keeps NaN as null: read it back as NaN.
                        final = {m: _nan_if_none(record[m]) for m in FINAL_METRICS}
                        boundary = np.load(saved) if seed == 0 else None
                    else:
                        final, boundary = _train_one(
                            config, data, name, width, seed, batches, grid, metrics,
                            saved if seed == 0 else None,
                        )
                    for key, value in final.items():
                        per_seed[name][width][key].append(value)
                    if boundary is not None:
                        boundaries[boundary_key(name, width)] = boundary
                    bar.update(1)
    wall = time.perf_counter() - started

    buf = io.BytesIO()
    np.savez_compressed(buf, **boundaries)
    write_atomic(run.file(BOUNDARIES), buf.getvalue())
    shutil.rmtree(partial)

    cells = {
        name: {str(w): {m: _stats(v) for m, v in per_seed[name][w].items()} for w in config.widths}
        for name in config.optimizers
    }
    results: dict[str, Any] = {
        "optimizers": list(config.optimizers),
        "widths": list(config.widths),
        "small_width": config.small,
        "wide_width": config.wide,
        "seeds": config.seeds,
        "hyperparams": {name: _hyperparams(name) for name in config.optimizers},
        "wall_seconds": wall,
        "cells": cells,
    }
    results["lecture"] = compare_with_lecture(cells, config.optimizers, config.small, config.wide)
    verdicts = claims(cells, config.optimizers, config.small, config.wide)
    run.write_summary(results, require_seeds(verdicts, config.seeds))


def boundary_key(optimizer: str, width: int) -> str:
    """The ``boundaries.npz`` entry holding ``p(class 1)`` on the mesh, ``(len(ys), len(xs))``."""
    return f"prob__{optimizer}__{width}"


def _median(cells: dict[str, Any], name: str, width: int, metric: str) -> float:
    return cells[name][str(width)][metric]["median"]


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN when it is undefined (a zero or NaN denominator), so a claim on it fails."""
    return a / b if b != 0 and not math.isnan(b) else float("nan")


def _width_note(small: int, wide: int) -> str:
    if (small, wide) == (LECTURE_WIDTHS["small"], LECTURE_WIDTHS["lazy"]):
        return ""
    return (
        f" (this run's widths are {small} and {wide}; the protocol's are "
        f"{LECTURE_WIDTHS['small']} and {LECTURE_WIDTHS['lazy']})"
    )


def claims(
    cells: dict[str, Any], optimizers: tuple[str, ...] | list[str], small: int, wide: int
) -> list[Claim]:
    """The protocol's pass/fail claims, computed from the per-cell medians.

    (a) lazy training: per optimizer, median relative movement at the widest width over that at
    the smallest, which must be below 1; for SGD, the inverse ratio must reach 4.
    (b) every optimizer's median test accuracy at the widest width is at least 0.85.
    """
    note = _width_note(small, wide)
    out = []
    for name in optimizers:
        moved = {w: _median(cells, name, w, "movement") for w in (small, wide)}
        ratio = _ratio(moved[wide], moved[small])
        out.append(
            Claim(
                name=f"lazy_movement_{name}",
                statement=(
                    f"{name}: the first layer's median relative movement ||W_T-W_0||/||W_0|| is "
                    f"smaller at width {wide} than at width {small} (value: wide / small){note}"
                ),
                value=ratio,
                op="<",
                threshold=1.0,
            )
        )
    if "sgd" in optimizers:
        out.append(
            Claim(
                name="lazy_movement_sgd_factor",
                statement=(
                    f"sgd: the first layer's median relative movement is at least "
                    f"{SGD_MOVEMENT_FACTOR:g}x smaller at width {wide} than at width {small} "
                    f"(value: small / wide){note}"
                ),
                value=_ratio(
                    _median(cells, "sgd", small, "movement"),
                    _median(cells, "sgd", wide, "movement"),
                ),
                op=">=",
                threshold=SGD_MOVEMENT_FACTOR,
            )
        )
    medians = {n: _median(cells, n, wide, "test_acc") for n in optimizers}
    # min() over floats would skip a NaN that is not first: name a diverged optimizer instead.
    diverged = [n for n, m in medians.items() if m is None or math.isnan(m)]
    out.append(
        Claim(
            name="lazy_test_accuracy",
            statement=(
                f"every optimizer's median test accuracy at width {wide} is at least "
                f"{LAZY_TEST_ACCURACY:g} (value: the lowest median){note}"
            ),
            value=None if diverged else min(medians.values()),
            op=">=",
            threshold=LAZY_TEST_ACCURACY,
            outcome=Outcome.undecided(
                f"no median test accuracy for {', '.join(diverged)}: a seed diverged (NaN)"
            ) if diverged else None,
        )
    )
    return out


def _ranking(cells: dict[str, Any], names: list[str], width: int) -> dict[str, Any]:
    """Rank optimizers by median test accuracy at ``width`` and set the gaps against seed noise.

    Test accuracy comes in steps of 1/n_test, so medians often tie: ``best`` and ``worst`` are the
    tied sets, in config order. ``gap`` is the leader's median minus the runner-up's (0 on a tie);
    ``spread`` is the larger of those two optimizers' seed ranges (max - min over seeds). As
    optimizers share data, init and batch order within a seed, ``paired_wins`` counts the seeds
    on which the leader beats the runner-up outright. ``median_range`` (best minus worst median)
    against ``typical_seed_range`` (the median of the optimizers' own seed ranges) says whether
    the ranking as a whole stands out of the noise.
    """

    def key(name: str) -> float:
        m = _median(cells, name, width, "test_acc")
        return -math.inf if m is None or math.isnan(m) else m  # a diverged run ranks last

    ranked = sorted(names, key=key, reverse=True)  # stable: ties keep config order
    top, bottom = key(ranked[0]), key(ranked[-1])
    stats = {n: cells[n][str(width)]["test_acc"] for n in names}
    ranges = [stats[n]["max"] - stats[n]["min"] for n in names]
    info: dict[str, Any] = {
        "order": ranked,
        "best": [n for n in ranked if key(n) == top],
        "best_test_acc": top,
        "worst": [n for n in ranked if key(n) == bottom],
        "worst_test_acc": bottom,
        # NaN (null in JSON) when a run diverged: no range to set against the noise then.
        "median_range": top - bottom if math.isfinite(top - bottom) else float("nan"),
        "typical_seed_range": float(np.median(ranges)),
    }
    if len(ranked) < 2:
        return info
    leader, runner_up = ranked[0], ranked[1]
    a, b = stats[leader], stats[runner_up]
    gap = a["median"] - b["median"]
    spread = max(a["max"] - a["min"], b["max"] - b["min"])
    info.update(
        leader=leader,
        runner_up=runner_up,
        runner_up_test_acc=b["median"],
        gap=gap,
        spread=spread,
        gap_exceeds_spread=bool(gap > spread),
        paired_wins=sum(x > y for x, y in zip(a["per_seed"], b["per_seed"], strict=True)),
        paired_seeds=len(a["per_seed"]),
    )
    return info


def compare_with_lecture(
    cells: dict[str, Any], optimizers: tuple[str, ...] | list[str], small: int, wide: int
) -> dict[str, Any]:
    """Where our numbers meet the lecture's (reported, not pass/fail).

    The lecture's "small" column is set against our smallest width and its "lazy" column against
    our widest, whatever those are; ``widths`` records both so a reader sees any mismatch.
    """
    ours = {"small": small, "lazy": wide}
    shared = [n for n in optimizers if n in LECTURE_TABLE]
    in_range: dict[str, dict[str, dict[str, Any]]] = {}
    inside = counted = 0
    for name in shared:
        in_range[name] = {}
        for regime, width in ours.items():
            in_range[name][regime] = {}
            lecture_row = LECTURE_TABLE[name][regime]
            for metric, lecture_value in zip(TABLE_METRICS, lecture_row, strict=True):
                s = cells[name][str(width)][metric]
                hit = bool(s["min"] <= lecture_value <= s["max"])
                in_range[name][regime][metric] = {
                    "lecture": lecture_value,
                    "median": s["median"],
                    "min": s["min"],
                    "max": s["max"],
                    "inside": hit,
                }
                inside += hit
                counted += 1

    best: dict[str, Any] = {}
    for regime, width in ours.items():
        ranking = _ranking(cells, list(optimizers), width)
        lecture_best = max(shared, key=lambda n: LECTURE_TABLE[n][regime][3]) if shared else None
        lecture_worst = min(shared, key=lambda n: LECTURE_TABLE[n][regime][3]) if shared else None
        best[regime] = {
            **ranking,
            "lecture_best": lecture_best,
            "lecture_worst": lecture_worst,
            # Agreement means the lecture's pick is among our tied leaders (or tied last).
            "best_agrees": lecture_best in ranking["best"],
            "worst_agrees": lecture_worst in ranking["worst"],
        }

    smooth: dict[str, Any] = {}
    for name in optimizers:
        s_small = _median(cells, name, small, "smoothness")
        s_wide = _median(cells, name, wide, "smoothness")
        smooth[name] = {
            "small": s_small,
            "lazy": s_wide,
            "lazy_over_small": _ratio(s_wide, s_small),
        }
    smoother = [n for n in optimizers if smooth[n]["lazy"] < smooth[n]["small"]]

    return {
        "widths": {
            "ours": ours,
            "lecture": dict(LECTURE_WIDTHS),
            "match": (small, wide) == (LECTURE_WIDTHS["small"], LECTURE_WIDTHS["lazy"]),
        },
        "in_range": in_range,
        "in_range_count": inside,
        "in_range_total": counted,
        "best": best,
        "smoothness": {
            "per_optimizer": smooth,
            "smoother_at_lazy": smoother,
            # The lecture's caption: "lazy regime produces smoother boundaries".
            "caption_holds_for_all": len(smoother) == len(optimizers),
        },
    }
