"""Optimizers across seeds and learning-rate multipliers: the two tracks of BENCHMARKS.md.

*Defaults track*: every seed at the optimizer's defaults (factor 1). *Tuned track*
(``--lr-sweep``): seed 0 at every multiplier of ``--sweep-factors`` -- the same multipliers for
every optimizer, ours and other libraries' (rule 9), all param groups scaled together -- and the
other seeds at the multiplier whose run ended with the lowest validation loss. The choice reads
the end of each run's own schedule, never a point on the way (rule 8).

Each (optimizer, seed, factor) is one unit of work whose ``run`` record in ``metrics.jsonl``
holds everything the tables need, so an interrupted benchmark resumes by reading finished units
back instead of training them again (:func:`finished_runs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from guided_descent.experiments.bench.protocol import run_one
from guided_descent.experiments.bench.workloads import Problem
from guided_descent.experiments.records import MetricsWriter, RunDir

if TYPE_CHECKING:
    from guided_descent.experiments.bench_train import Config

# The fields that name a unit of work in its "run" record.
UNIT = ("optimizer", "seed", "lr_factor")


def _number(x: Any) -> Any:
    """A float as JSON stored it back: ``None`` (NaN) and ``"inf"`` strings become floats."""
    if x is None:
        return math.nan
    if isinstance(x, str) and x in ("inf", "-inf"):
        return float(x)
    return x


def _restore(record: dict[str, Any]) -> dict[str, Any]:
    """A ``run`` record read from ``metrics.jsonl`` in the form :func:`run_one` returns."""
    out = dict(record)
    out["final"] = {k: _number(v) for k, v in record["final"].items()}
    out["curve"] = [(row[0], row[1], _number(row[2]), _number(row[3])) for row in record["curve"]]
    return out


def finished_runs(run: RunDir) -> dict[tuple, dict[str, Any]]:
    """The units an interrupted run finished, by (optimizer, seed, lr_factor); the records of
    the unit it was cut off in are dropped from ``metrics.jsonl`` (it runs again)."""
    done = {key: _restore(r) for key, r in run.finished_units(UNIT, event="run").items()
            if "curve" in r}
    if done:
        run.keep_metrics(lambda r: "optimizer" not in r
                         or tuple(r.get(f) for f in UNIT) in done)
    return done


def run_all(
    config: Config, problems: dict[int, Problem], names: list[str], factors: tuple[float, ...],
    metrics: MetricsWriter, bar: Any, device: torch.device,
    done: dict[tuple, dict[str, Any]] | None = None,
    failed: Callable[[str, Exception], bool] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, float], dict[str, dict[str, float | None]]]:
    """Every optimizer's runs, interleaved: seed 0 at each learning-rate factor (the sweep), then
    the other seeds at each optimizer's best factor -- and within each of these rounds, every
    optimizer in turn.

    Interleaving keeps the runs that are compared close in time: a ratio pairs an optimizer's
    seed with AdamW's, and on a machine whose load drifts (another job starts or ends) runs
    done one optimizer after another would see different loads for the two sides of a pair.

    ``done`` holds runs finished before an interruption (reused, not retrained). ``failed(name,
    error)`` decides what an optimizer's exception does: ``True`` drops that optimizer from the
    rest of the benchmark (another library's failure), ``False`` re-raises. Returns, per
    optimizer that finished, its runs at the chosen factor (seed order), the factor, and the
    final validation loss of each factor tried.
    """
    done = done or {}
    loss_metric = config.workload.loss_metric
    active = list(names)

    def one(name: str, seed: int, factor: float) -> dict | None:
        key = (name, seed, factor)
        if key in done:
            record = done[key]
        else:
            bar.set_postfix_str(f"{name} seed {seed}" + (f" lr x{factor:g}"
                                                          if len(factors) > 1 else ""))
            try:
                record = run_one(config, problems[seed], name, seed, factor, metrics,
                                 device=device)
            except Exception as e:
                if failed is None or not failed(name, e):
                    raise
                active.remove(name)
                return None
        bar.update()
        return record

    first: dict[str, dict[float, dict]] = {name: {} for name in names}
    for factor in factors:
        for name in list(active):
            record = one(name, 0, factor)
            if record is not None:
                first[name][factor] = record
    chosen = {name: min(first[name], key=lambda f, n=name: sweep_score(first[n][f],
                                                                          loss_metric, f))
              for name in active}
    runs = {name: [first[name][chosen[name]]] for name in active}
    for seed in range(1, config.seeds):
        for name in list(active):
            record = one(name, seed, chosen[name])
            if record is not None:
                runs[name].append(record)
    tried = {name: {f"{f:g}": (r["final"].get(loss_metric) if r["finite"] else None)
                    for f, r in first[name].items()} for name in active}
    return ({n: runs[n] for n in active}, {n: chosen[n] for n in active},
            {n: tried[n] for n in active})


def sweep_score(record: dict, loss_metric: str, factor: float) -> tuple[float, float]:
    """Lower is better: the final validation loss, read at the end of the run's schedule
    (diverged runs last), ties to factor 1."""
    value = record["final"].get(loss_metric) if record["finite"] else None
    score = value if value is not None and math.isfinite(value) else math.inf
    return score, abs(math.log(factor))


__all__ = ["UNIT", "finished_runs", "run_all", "sweep_score"]
