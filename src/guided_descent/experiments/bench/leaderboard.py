"""The leaderboard: every workload's time and steps to target relative to AdamW, and one number
per optimizer across workloads, per track and device (BENCHMARKS.md rules 4 and 6).

Input: the ``summary.json`` of each ``bench train`` run of a suite (one per track and workload),
so it is a pure function of run files. Per workload and seed ``s`` (seeds pair up: same data
order, same initial weights) the time ratio is ``r_s = t_s / t_AdamW,s``, ``t`` the training
seconds to the workload's primary target. A run that misses has no time to target; its ratio is
then a bound, kept with its direction:

* the optimizer missed, AdamW reached: ``r_s >= T_s / t_AdamW,s`` (``T``: the run's whole clocked
  training time), a lower bound;
* AdamW missed, the optimizer reached: ``r_s <= t_s / T_AdamW,s``, an upper bound;
* both missed: no ratio (the workload drops out of that optimizer's aggregate, and says so).

Across workloads (rule 6): the geometric mean of the time ratios, each workload weighted equally
(the mean over workloads of the mean over seeds of ``log r_s``). Its interval is a percentile
bootstrap over seeds: :data:`RESAMPLES` resamples from ``numpy.random.default_rng(SEED)``, each
drawing every workload's seeds with replacement; the interval runs from the 0.1 % to the 99.9 %
quantile, so each end is a one-sided bound at p = 0.001, the z = 3.09 of rule 4. With three
seeds per workload the bootstrap under-covers (it cannot see more spread than the seeds show);
read it as the protocol's yardstick, not as exact coverage.

The same geometric mean and interval over the *steps* ratios (``aggregate``'s ``steps``) shows
what each method does per update, free of the machine's load; the verdict is on time.

Verdict per optimizer and track ("faster than AdamW across workloads"): PASS when the upper end
of the interval is below 1 and no ratio in it is a lower bound (a miss could hide a slower run);
FAIL when the lower end is above 1 and no ratio is an upper bound; otherwise UNDECIDED, with the
reason. Fewer seeds than rule 4 asks for leave it UNDECIDED too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guided_descent.experiments.bench.claims import BASELINE, clears_spread
from guided_descent.experiments.records import FAIL, PASS, Claim, Outcome

RESAMPLES = 10_000
SEED = 0
# The interval's quantiles: each end one-sided at p = 0.001 (z = 3.09, rule 4).
LOW_Q, HIGH_Q = 0.001, 0.999
EXACT, LOWER, UPPER, NONE = "exact", "lower", "upper", "none"


@dataclass(frozen=True)
class Ratio:
    """One seed's ratio to AdamW and what it is: exact, a lower or upper bound, or none."""

    value: float | None
    kind: str


def _num(x: Any) -> float | None:
    """A number from summary.json (inf is stored as the string ``"inf"``; NaN as ``null``)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def seed_ratios(row: Mapping[str, Any], base: Mapping[str, Any], quantity: str) -> list[Ratio]:
    """Per-seed ratios of ``quantity`` (``seconds`` or ``steps`` to the primary target) of one
    optimizer's row to AdamW's row of the same run (see the module docstring for misses)."""
    mine, theirs = row.get("target"), base.get("target")
    if mine is None or theirs is None:
        return []
    reached = mine.get("reached_per_seed") or [_num(v) is not None for v in
                                               mine["seconds"]["per_seed"]]
    base_reached = theirs.get("reached_per_seed") or [_num(v) is not None for v in
                                                      theirs["seconds"]["per_seed"]]
    if quantity == "seconds":
        mine_v = [_num(v) for v in mine["seconds"]["per_seed"]]
        base_v = [_num(v) for v in theirs["seconds"]["per_seed"]]
        mine_total = [_num(v) for v in row["train_seconds"]["per_seed"]]
        base_total = [_num(v) for v in base["train_seconds"]["per_seed"]]
    else:  # steps: a miss is recorded as budget + 1, itself the bound
        mine_v = mine_total = [_num(v) for v in mine["steps"]["per_seed"]]
        base_v = base_total = [_num(v) for v in theirs["steps"]["per_seed"]]
    out = []
    for s in range(min(len(mine_v), len(base_v))):
        a, b = reached[s], base_reached[s]
        if a and b:
            out.append(_ratio(mine_v[s], base_v[s], EXACT))
        elif b:
            out.append(_ratio(mine_total[s], base_v[s], LOWER))
        elif a:
            out.append(_ratio(mine_v[s], base_total[s], UPPER))
        else:
            out.append(Ratio(None, NONE))
    return out


def _ratio(num: float | None, den: float | None, kind: str) -> Ratio:
    if num is None or den is None or den <= 0 or num <= 0:
        return Ratio(None, NONE)
    return Ratio(num / den, kind)


def _bound_kind(kinds: set[str]) -> str:
    """What a statistic over ratios of these kinds is: exact, a lower/upper bound, or mixed."""
    kinds = kinds - {EXACT}
    if not kinds:
        return EXACT
    if kinds == {LOWER}:
        return LOWER
    if kinds == {UPPER}:
        return UPPER
    return "mixed"


def spread(ratios: Sequence[Ratio]) -> dict[str, Any]:
    """Median, min and max of the defined ratios, and what they are (a bound or not)."""
    values = [r.value for r in ratios if r.value is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "kind": NONE, "n": 0}
    return {"median": float(np.median(values)), "min": min(values), "max": max(values),
            "kind": _bound_kind({r.kind for r in ratios if r.value is not None}),
            "n": len(values), "missing": sum(r.value is None for r in ratios)}


def geometric_mean(per_workload: Mapping[str, Sequence[Ratio]], resamples: int = RESAMPLES,
                   seed: int = SEED) -> dict[str, Any]:
    """Rule 6's aggregate over workloads, with the bootstrap interval over seeds.

    ``per_workload``: workload -> that workload's per-seed ratios. A workload with a seed
    without a ratio (both missed) is left out and listed in ``excluded``.
    """
    logs: dict[str, np.ndarray] = {}
    kinds: set[str] = set()
    excluded = []
    for name, ratios in per_workload.items():
        if not ratios or any(r.value is None for r in ratios):
            excluded.append(name)
            continue
        logs[name] = np.log(np.array([r.value for r in ratios], dtype=float))
        kinds |= {r.kind for r in ratios}
    if not logs:
        return {"value": None, "low": None, "high": None, "kind": NONE, "workloads": [],
                "excluded": excluded, "resamples": resamples, "seed": seed}
    point = float(np.exp(np.mean([v.mean() for v in logs.values()])))
    rng = np.random.default_rng(seed)
    # Each resample: every workload's seeds drawn with replacement, its mean log ratio, then
    # the mean over workloads (every workload weighted equally, as in the point estimate).
    means = np.zeros(resamples)
    for v in logs.values():
        idx = rng.integers(0, len(v), size=(resamples, len(v)))
        means += v[idx].mean(axis=1)
    means /= len(logs)
    low, high = np.exp(np.quantile(means, [LOW_Q, HIGH_Q]))
    return {"value": point, "low": float(low), "high": float(high), "kind": _bound_kind(kinds),
            "workloads": sorted(logs), "excluded": excluded, "resamples": resamples,
            "seed": seed, "quantiles": [LOW_Q, HIGH_Q]}


def workload_table(summary: Mapping[str, Any]) -> dict[str, Any]:
    """One workload of one track: per optimizer the time and steps ratios to AdamW (median and
    range over seeds, what they are), whether it reached the target, and rule 4's flag."""
    res = summary["results"]
    rows = res["optimizers"]
    base = rows.get(BASELINE)
    out: dict[str, Any] = {}
    if base is None:
        return out
    for name, row in rows.items():
        if name == BASELINE:
            continue
        seconds = seed_ratios(row, base, "seconds")
        steps = seed_ratios(row, base, "steps")
        target = row.get("target") or {}
        beyond = None
        if target and base.get("target"):
            beyond = clears_spread([_inf(v) for v in base["target"]["seconds"]["per_seed"]],
                                   [_inf(v) for v in target["seconds"]["per_seed"]])
        out[name] = {
            "kind": row.get("kind", "registry"),
            "lr_factor": row.get("lr_factor", 1.0),
            "seconds": spread(seconds),
            "steps": spread(steps),
            "seconds_per_seed": [[r.value, r.kind] for r in seconds],
            "steps_per_seed": [[r.value, r.kind] for r in steps],
            "reached": target.get("reached", 0),
            "seeds": row["seeds"],
            "faster_beyond_spread": beyond,
            "opt_step_ms_ratio": (row.get("vs_adamw") or {}).get("opt_step_ms"),
        }
    return out


def _inf(x: Any) -> float:
    v = _num(x)
    return math.inf if v is None else v


def aggregate(tables: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per optimizer, the geometric mean over the workloads it ran in (``tables``: workload ->
    :func:`workload_table`)."""
    names = sorted({n for t in tables.values() for n in t})
    out = {}
    for name in names:
        per_workload = {
            w: [Ratio(v, k) for v, k in t[name]["seconds_per_seed"]]
            for w, t in tables.items() if name in t
        }
        out[name] = geometric_mean(per_workload)
        # The same over steps to target: what the method does per update, free of the machine's
        # load (a time ratio on a shared machine also measures whatever else ran).
        out[name]["steps"] = geometric_mean({
            w: [Ratio(v, k) for v, k in t[name].get("steps_per_seed", [])]
            for w, t in tables.items() if name in t
        })
        out[name]["seeds"] = out[name]["steps"]["seeds"] = min(
            (t[name]["seeds"] for t in tables.values() if name in t), default=0)
    return out


def interval_outcome(agg: Mapping[str, Any], minimum: int) -> Outcome:
    """PASS when a geometric mean's whole interval lies below 1 (with no lower bound in it),
    FAIL when it lies above 1 (no upper bound), else UNDECIDED with the reason."""
    kind = agg.get("kind")
    if agg.get("value") is None:
        return Outcome.undecided("no workload where both it and AdamW have a ratio")
    interval = f"[{agg['low']:.3g}, {agg['high']:.3g}]"
    if agg.get("seeds", 0) < minimum:
        return Outcome.undecided(f"{agg.get('seeds')} seed(s): rule 4 needs at least {minimum}")
    if agg["high"] < 1 and kind in ("exact", "upper"):
        return Outcome(PASS, f"interval {interval} lies below 1")
    if agg["low"] > 1 and kind in ("exact", "lower"):
        return Outcome(FAIL, f"interval {interval} lies above 1: slower than AdamW")
    if kind == "mixed":
        return Outcome.undecided(f"interval {interval} mixes lower and upper bounds (misses on "
                                 "both sides): not a measurement")
    if agg["high"] < 1 or agg["low"] > 1:
        return Outcome.undecided(f"interval {interval} excludes 1, but some ratios are {kind} "
                                 "bounds from missed targets that could reverse it")
    return Outcome.undecided(f"interval {interval} contains 1: within the seed spread")


def verdict(name: str, track: str, agg: Mapping[str, Any], minimum: int) -> Claim:
    """"``name`` is faster than AdamW across workloads" on ``track`` (see the module doc)."""
    statement = (f"{track} track: {name} reaches the targets faster than AdamW across workloads "
                 "(value: geometric mean of time ratios; PASS needs the whole bootstrap interval "
                 "below 1)")
    value = agg.get("value")
    if value is None:
        return Claim(f"leaderboard: {name} vs adamw ({track})", statement, None, "<", 1.0,
                     Outcome.undecided("no workload where both it and AdamW have a ratio"))
    outcome = interval_outcome(agg, minimum)
    return Claim(f"leaderboard: {name} vs adamw ({track})", statement, value, "<", 1.0, outcome)


__all__ = [
    "RESAMPLES",
    "SEED",
    "Ratio",
    "aggregate",
    "geometric_mean",
    "interval_outcome",
    "seed_ratios",
    "spread",
    "verdict",
    "workload_table",
]
