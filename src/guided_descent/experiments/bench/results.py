"""From run records to ``bench train``'s tables: targets, time to target, statistics over seeds.

A run record (:func:`~guided_descent.experiments.bench.protocol.run_one`) keeps every evaluation
as ``curve`` rows ``(step, training seconds, metric, loss metric)``. From those:

* :func:`resolve_targets` sets the targets: the task's protocol target (a fixed value, or AdamW's
  metric at a fraction of its budget), any further fixed targets the task publishes beside it,
  AdamW's final validation loss, and which one the claims call primary;
* :func:`time_to_target` reads a run's steps, samples and seconds to a target (rule 3), counting
  it only when the run still meets the target at the end of its own schedule (rule 8);
* :func:`summarize` turns each optimizer's runs into median, range and per-seed values, and ratios
  to AdamW measured in the same run.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from guided_descent.experiments.bench.claims import BASELINE, clears_spread

if TYPE_CHECKING:
    from guided_descent.experiments.bench_train import Config

# `--target` values besides a number.
TARGET_CHOICES = ("protocol", "adamw")


def _stats(values: list[float | None]) -> dict[str, Any]:
    """Median, min, max over seeds (``None`` counts as inf: a miss), and the per-seed values."""
    arr = [math.inf if v is None else float(v) for v in values]
    if not arr:
        return {"median": None, "min": None, "max": None, "per_seed": []}
    if any(math.isnan(a) for a in arr):  # a diverged seed: no order statistic is meaningful
        return {"median": math.nan, "min": math.nan, "max": math.nan, "per_seed": arr}
    return {"median": float(np.median(arr)), "min": min(arr), "max": max(arr), "per_seed": arr}


def meets(value: float | None, target: float, maximize: bool) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= target if maximize else value <= target


def time_to_target(curve: list, target: float, maximize: bool, index: int, budget: int,
                   samples_per_step: int) -> dict[str, Any]:
    """Steps, samples and seconds at the first evaluation whose metric meets ``target``.

    The run counts as having reached the target only when its last evaluation -- the end of its
    own schedule -- meets it too: a curve that dips below the target and comes back up has
    crossed it, which is not a result (BENCHMARKS.md rule 8). Such a run is a miss with
    ``lost=True``. A miss gets ``budget + 1`` steps and no samples or time.
    """
    first = next(((step, seconds) for step, seconds, *values in curve
                  if step > 0 and meets(values[index], target, maximize)), None)
    at_end = bool(curve) and curve[-1][0] > 0 and meets(curve[-1][2 + index], target, maximize)
    if first is not None and at_end:
        step, seconds = first
        return {"steps": step, "samples": step * samples_per_step, "seconds": seconds,
                "reached": True, "lost": False}
    return {"steps": budget + 1, "samples": None, "seconds": None, "reached": False,
            "lost": first is not None}


def value_at_fraction(curve: list, fraction: float, index: int,
                      total: int | None = None) -> float | None:
    """The metric at the first evaluation at or after ``fraction`` of ``total`` steps (default:
    the run's last step); ``None`` when the run stopped before that point."""
    total = curve[-1][0] if total is None else total
    for step, _, *values in curve:
        if step >= fraction * total:
            return values[index]
    return None


def resolve_targets(config: Config, runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """The targets of this run, each ``{metric, maximize, value, text}``.

    ``protocol``: the task's (a fixed value, or AdamW's metric at ``baseline_fraction`` of the
    budget, median over its finite seeds; ``None`` when no AdamW run is finite); one entry per
    label of the workload's ``extra_targets``; ``adamw``: AdamW's final validation loss (median
    over finite seeds); ``primary``: the one ``--target`` picks (or a number on the metric).
    """
    w = config.workload
    base = runs.get(BASELINE, [])
    targets: dict[str, dict[str, Any]] = {}
    if w.target_value is not None:
        targets["protocol"] = {"metric": w.metric, "maximize": w.maximize,
                               "value": w.target_value, "text": w.target_text}
    else:
        fraction = w.baseline_fraction or 1.0
        at = [value_at_fraction(r["curve"], fraction, 0, config.budget) for r in base
              if r["finite"]]
        at = [v for v in at if v is not None and math.isfinite(v)]
        targets["protocol"] = {"metric": w.metric, "maximize": w.maximize,
                               "value": float(np.median(at)) if at else None,
                               "text": w.target_text, "from": f"{BASELINE} at {fraction:.0%}"}
    for label, value, text in w.extra_targets:
        targets[label] = {"metric": w.metric, "maximize": w.maximize, "value": value,
                          "text": text}
    finals = [r["curve"][-1][3] for r in base if r["finite"]]
    targets["adamw"] = {
        "metric": w.loss_metric, "maximize": False,
        "value": float(np.median(finals)) if finals else None,
        "text": f"{w.loss_metric} <= AdamW's final value (median over seeds)",
    }
    if config.target in TARGET_CHOICES:
        targets["primary"] = {**targets[config.target], "source": config.target}
    else:
        targets["primary"] = {"metric": w.metric, "maximize": w.maximize,
                              "value": float(config.target), "source": "command line",
                              "text": f"{w.metric} {'>=' if w.maximize else '<='} {config.target}"}
    return targets


def _hits(config: Config, rs: list[dict], target: dict[str, Any],
          samples_per_step: int) -> dict[str, Any]:
    """Steps, samples, seconds to ``target`` over seeds, which seeds reached it, how many lost it
    again before the end of their schedule."""
    index = 0 if target["metric"] == config.workload.metric else 1
    hits = [time_to_target(r["curve"], target["value"], target["maximize"], index, config.budget,
                           samples_per_step) for r in rs]
    return {
        "steps": _stats([h["steps"] for h in hits]),
        "samples": _stats([h["samples"] for h in hits]),
        "seconds": _stats([h["seconds"] for h in hits]),
        "reached": sum(h["reached"] for h in hits),
        "reached_per_seed": [h["reached"] for h in hits],
        "lost": sum(h["lost"] for h in hits),
    }


def summarize(config: Config, runs: dict[str, list[dict]], samples_per_step: int
              ) -> dict[str, Any]:
    """Per-optimizer statistics over seeds and ratios to AdamW from the same run.

    Each optimizer's row holds ``target`` (the primary target), ``adamw_target`` and
    ``extra_targets`` (label -> the same), each present only when its value could be set.
    """
    w = config.workload
    targets = resolve_targets(config, runs)
    extra = [label for label, _, _ in w.extra_targets]
    budget = config.budget
    table: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        row: dict[str, Any] = {"kind": rs[0]["kind"], "note": rs[0]["note"],
                               "lr_factor": rs[0]["lr_factor"]}
        for key, tgt in (("target", targets["primary"]), ("adamw_target", targets["adamw"])):
            if tgt["value"] is not None:
                row[key] = _hits(config, rs, tgt, samples_per_step)
        row["extra_targets"] = {label: _hits(config, rs, targets[label], samples_per_step)
                                for label in extra}
        row["final_metric"] = _stats([r["final"].get(w.metric) for r in rs])
        row["final_loss"] = _stats([r["final"].get(w.loss_metric) for r in rs])
        for key in ("step_ms", "opt_step_ms", "train_seconds", "steps_done"):
            row[key] = _stats([r[key] for r in rs])
        row["state_bytes"] = rs[0]["state_bytes"]
        row["trainable_params"] = rs[0]["trainable_params"]
        row["state_bytes_per_param"] = rs[0]["state_bytes"] / rs[0]["trainable_params"]
        row["finite"] = all(r["finite"] for r in rs)
        row["nonfinite_runs"] = sum(not r["finite"] for r in rs)
        row["stopped_by_clock"] = sum(r["stopped_by_clock"] for r in rs)
        row["seeds"] = len(rs)
        table[name] = row
    base = table.get(BASELINE)
    if base is not None:
        for name, row in table.items():
            ratios: dict[str, float | bool | None] = {}
            for key in ("step_ms", "opt_step_ms"):
                b, o = base[key]["median"], row[key]["median"]
                ratios[key] = o / b if b and o is not None else None
            ratios["state_bytes"] = (row["state_bytes"] / base["state_bytes"]
                                     if base["state_bytes"] else None)
            if "target" in row and "target" in base:
                for key in ("steps", "seconds"):
                    b, o = base["target"][key]["median"], row["target"][key]["median"]
                    ratios[f"{key}_to_target"] = (
                        o / b if b and math.isfinite(b) and math.isfinite(o) else None)
                # AdamW's median is a miss (budget + 1): the step ratio is only an upper bound.
                ratios["steps_to_target_is_bound"] = (
                    name != BASELINE and base["target"]["steps"]["median"] > budget)
                row["faster_than_adamw_beyond_spread"] = {
                    key: clears_spread(base["target"][key]["per_seed"],
                                       row["target"][key]["per_seed"])
                    for key in ("steps", "seconds")
                } if name != BASELINE else None
            row["vs_adamw"] = ratios
    return {"targets": targets, "optimizers": table, "extra_targets": extra}


__all__ = ["TARGET_CHOICES", "meets", "resolve_targets", "summarize", "time_to_target",
           "value_at_fraction"]
