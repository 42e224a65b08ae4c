"""The claims of ``bench train``: what the runs show, PASS / FAIL / UNDECIDED with the reason.

"Measuring fairly" in BENCHMARKS.md, as tests on the per-seed values of a summary's table:

* **Rule 4, a speed-up must clear the seed spread.** "A is faster than B" passes only when A is
  faster in every seed *and* the paired gains ``d_s = B_s − A_s`` (seeds pair up: the same data
  order and initial weights) satisfy ``mean(d)·√n ≥ 3.09·sd(d)`` -- the protocol's
  ``(target − mean)·√n ≥ 3.09·σ`` applied to the paired differences, a one-sided z-test at
  p ≈ 0.001 (:func:`clears_spread`). With three seeds the z-test is an approximation (a t-test
  would ask for more); requiring every seed to agree as well keeps it conservative. A miss counts
  ``budget + 1`` steps, a lower bound of the true count, so a gain over a run that missed is
  a lower bound too and the test stays conservative.
* **Rule 7, no verdict without evidence.** Fewer seeds than rule 4 asks for (3 on CPU, 5 on a
  GPU), nobody reaching the target, no target (AdamW, which sets it, diverged), a run stopped
  by the clock before the end of its schedule: UNDECIDED, with the reason. A ranking needs its
  winner to reach the target in every seed.
* **Rule 8, read at the end of each schedule.** A run reaches a target only if it still meets
  it at its last evaluation (:func:`~guided_descent.experiments.bench.results.time_to_target`).
* **Rule 9, like with like.** Our optimizer against another library's implementation of the same
  algorithm: step time and final score, median against median, by the same paired test.

Orderings (:func:`compare`), for per-seed values where lower is better:

* ``A < B``: PASS if A reached in every seed and beats B beyond the spread; FAIL if B reached in
  every seed and its median is no worse than A's (B is at least as good); else UNDECIDED.
* ``A <= B``: PASS if A reached in every seed and its median is no worse than B's; FAIL if B beats
  A beyond the spread; else UNDECIDED. (``A < B`` fails exactly when ``B <= A`` passes.)

A tier "A / B < C / D" is the conjunction over its pairs: PASS when every pair passes, FAIL when
one fails, else UNDECIDED.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from guided_descent.experiments import peers as peer_lib
from guided_descent.experiments.records import FAIL, PASS, UNDECIDED, Claim, Outcome

if TYPE_CHECKING:
    from guided_descent.experiments.bench_train import Config

BASELINE = "adamw"
# Significance of a speed-up (BENCHMARKS.md, "Measuring fairly" 4): the mean paired difference
# must clear z = 3.09 standard deviations of the mean (one-sided p ~ 0.001).
Z_SPREAD = 3.09
# Rule 4's seed counts: a verdict over seeds needs at least these many.
MIN_SEEDS_CPU, MIN_SEEDS_GPU = 3, 5


def min_seeds(device: str) -> int:
    return MIN_SEEDS_GPU if device.startswith("cuda") else MIN_SEEDS_CPU


def clears_spread(baseline: list[float], other: list[float]) -> bool:
    """Whether ``other`` is smaller than ``baseline`` beyond the seed spread, paired by seed.

    With ``d_s = baseline_s - other_s``: every ``d_s > 0`` and ``mean(d)·√n >= 3.09·sd(d)``.
    A miss (``inf``) of ``other`` fails; a miss of the baseline where ``other`` hit is an
    infinite gain, which clears the spread. One seed has no spread to clear: ``False``.
    """
    if len(baseline) < 2 or len(baseline) != len(other):
        return False
    if not all(math.isfinite(o) for o in other):
        return False
    d = [b - o for b, o in zip(baseline, other, strict=True)]
    if any(not x > 0 for x in d):
        return False
    if any(math.isinf(x) for x in d):
        return True
    return statistics.fmean(d) * math.sqrt(len(d)) >= Z_SPREAD * statistics.stdev(d)


def _g(x: float) -> str:
    return f"{x:.3g}"


@dataclass(frozen=True)
class Side:
    """One optimizer's per-seed values of a quantity where lower is better, paired by seed.

    ``ok[s]``: seed ``s`` produced the outcome (reached the target at the end of its schedule, a
    finite step time or score). A value that is not ok is a lower bound (a miss counted as
    ``budget + 1``) or ``inf`` (diverged). ``unfinished``: runs the clock stopped before the end
    of their schedule.
    """

    name: str
    values: tuple[float, ...]
    ok: tuple[bool, ...]
    unfinished: int = 0

    @classmethod
    def of(cls, name: str, values: list[float | None], ok: list[bool] | None = None,
           unfinished: int = 0) -> Side:
        clean = tuple(math.inf if v is None or math.isnan(v) else float(v) for v in values)
        flags = tuple(math.isfinite(v) for v in clean) if ok is None else tuple(
            bool(o) and math.isfinite(v) for o, v in zip(ok, clean, strict=True))
        return cls(name, clean, flags, unfinished)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def missed(self) -> int:
        return sum(not o for o in self.ok)


def beats(a: Side, b: Side) -> tuple[bool, str]:
    """Whether ``a`` reached in every seed and is below ``b`` beyond the spread; the gains."""
    d = [y - x for x, y in zip(a.values, b.values, strict=True)]
    shown = ", ".join("inf" if math.isinf(x) else _g(x) for x in d)
    if a.missed:
        return False, f"gains {shown}"
    if not clears_spread(list(b.values), list(a.values)):
        if all(x > 0 for x in d):
            z = statistics.fmean(d) * math.sqrt(len(d)) / statistics.stdev(d)
            return False, f"gains {shown}: mean·√n/sd = {_g(z)} < {Z_SPREAD}"
        return False, f"gains {shown}: not ahead in every seed"
    return True, f"gains {shown} clear {Z_SPREAD} standard errors"


def compare(a: Side, b: Side, op: str, minimum: int, what: str) -> Outcome:
    """``a op b`` on per-seed values where lower is better (see the module docstring)."""
    n = len(a.values)
    if n != len(b.values):
        return Outcome.undecided(f"{a.name} and {b.name} ran different numbers of seeds")
    if n < minimum:
        return Outcome.undecided(f"{n} seed(s): rule 4 needs at least {minimum}")
    for side in (a, b):
        if side.unfinished:
            return Outcome.undecided(
                f"{side.unfinished} run(s) of {side.name} stopped by the clock before the end of "
                "their schedule (rule 8)")
    if a.missed == n and b.missed == n:
        return Outcome.undecided(f"neither {a.name} nor {b.name} reached {what} in any seed")
    if op == "<":
        win, gains = beats(a, b)
        if win:
            return Outcome(PASS, f"{a.name} reached {what} in every seed, ahead of {b.name} by "
                           f"{gains}")
        if not b.missed and b.median <= a.median:
            return Outcome(FAIL, f"{b.name} reached {what} in every seed with median "
                           f"{_g(b.median)}, no worse than {a.name}'s {_g(a.median)}")
        if a.missed:
            return Outcome.undecided(f"{a.name} missed {what} in {a.missed} of {n} seeds")
        return Outcome.undecided(f"within the seed spread: {a.name} vs {b.name}: {gains}")
    if op != "<=":
        raise ValueError(f"op must be '<' or '<=', got {op!r}")
    if not a.missed and a.median <= b.median:
        return Outcome(PASS, f"{a.name} reached {what} in every seed with median "
                       f"{_g(a.median)}, no worse than {b.name}'s {_g(b.median)}")
    win, gains = beats(b, a)
    if win:
        return Outcome(FAIL, f"{b.name} reached {what} in every seed, ahead of {a.name} by "
                       f"{gains}")
    if a.missed:
        return Outcome.undecided(f"{a.name} missed {what} in {a.missed} of {n} seeds")
    return Outcome.undecided(f"within the seed spread: {a.name}'s median {_g(a.median)} vs "
                             f"{b.name}'s {_g(b.median)}; {b.name} vs {a.name}: {gains}")


def conjunction(outcomes: list[Outcome]) -> Outcome:
    """All pairs PASS: PASS; one FAIL: FAIL (its reason); otherwise UNDECIDED (the first reason)."""
    for verdict in (FAIL, UNDECIDED):
        for o in outcomes:
            if o.verdict == verdict:
                return o
    return Outcome(PASS, "; ".join(o.reason for o in outcomes))


def _side(name: str, row: dict[str, Any], quantity: str, target_key: str) -> Side | None:
    """A row's per-seed values of a ranking quantity (``None``: the target could not be set)."""
    if quantity == "steps":
        hits = row.get(target_key) if target_key in ("target", "adamw_target") else (
            row.get("extra_targets", {}).get(target_key))
        if hits is None:
            return None
        return Side.of(name, hits["steps"]["per_seed"], hits["reached_per_seed"],
                       row["stopped_by_clock"])
    return Side.of(name, row[quantity]["per_seed"], unfinished=row["stopped_by_clock"])


def ranking_claims(config: Config, table: dict[str, dict[str, Any]],
                   target_key: str = "target", target_text: str = "",
                   suffix: str = "") -> tuple[list[Claim], list[str]]:
    """One claim per adjacent pair of tiers of each expected ranking, among what ran.

    ``target_key`` picks the target of steps-based rankings (``target``: the primary one, or a
    label of the workload's ``extra_targets``); ``suffix`` is added to the claim names.
    """
    out: list[Claim] = []
    notes: list[str] = []
    minimum = min_seeds(config.device)
    for ranking in config.workload.rankings:
        if ranking.quantity != "steps" and target_key != "target":
            continue  # step time does not depend on the target: judged once
        tiers = [[n for n in tier if n in table] for tier in ranking.tiers]
        missing = [n for tier in ranking.tiers for n in tier if n not in table]
        if missing:
            notes.append(f"{ranking.text}: not run here: {', '.join(missing)}")
        tiers = [t for t in tiers if t]
        steps = ranking.quantity == "steps"
        what = "steps to target" if steps else "optimizer step time"
        for fast, slow in zip(tiers[:-1], tiers[1:], strict=False):
            sides = {n: _side(n, table[n], ranking.quantity, target_key) for n in fast + slow}
            name = f"ranking: {'/'.join(fast)} {ranking.op} {'/'.join(slow)}{suffix}"
            statement = (
                f"{ranking.text}: {what} of {', '.join(fast)} {ranking.op} that of "
                f"{', '.join(slow)}{' (' + target_text + ')' if target_text else ''}, by the "
                "paired seed test of rule 4 (value: slowest median of the first / fastest median "
                "of the second)")
            if any(s is None for s in sides.values()):
                out.append(Claim(name, statement, None, ranking.op, 1.0, Outcome.undecided(
                    "no target: AdamW, which sets it, has no finite run")))
                continue
            worst_fast = max(sides[n].median for n in fast)  # type: ignore[union-attr]
            best_slow = min(sides[n].median for n in slow)  # type: ignore[union-attr]
            value = worst_fast / best_slow if best_slow and math.isfinite(best_slow) else None
            outcome = conjunction([
                compare(sides[f], sides[s], ranking.op, minimum,  # type: ignore[arg-type]
                        "the target" if steps else "a step time")
                for f in fast for s in slow])
            if value is None and outcome.verdict == PASS:
                outcome = Outcome.undecided("no finite median to compare")
            out.append(Claim(name, statement, value, ranking.op, 1.0, outcome))
    return out, notes


def all_reach_claim(config: Config, table: dict[str, dict[str, Any]],
                    target: dict[str, Any]) -> Claim:
    """Every run of every optimizer reaches the target (at the end of its schedule)."""
    runs = sum(r["seeds"] for r in table.values())
    rows = {n: r.get("target") for n, r in table.items()}
    statement = f"every run reaches the target ({target['text']}) (value: fraction of runs)"
    if any(h is None for h in rows.values()):
        return Claim("all-reach", statement, None, "==", 1.0, Outcome.undecided(
            "no target: AdamW, which sets it, has no finite run"))
    reached = sum(h["reached"] for h in rows.values())
    missed = [f"{n} ({r['seeds'] - rows[n]['reached']}/{r['seeds']})"
              for n, r in table.items() if rows[n]["reached"] < r["seeds"]]
    seeds = min(r["seeds"] for r in table.values())
    value = reached / runs if runs else None
    if missed:
        outcome = Outcome(FAIL, "missed: " + ", ".join(missed))
    elif seeds < min_seeds(config.device):
        outcome = Outcome.undecided(f"{seeds} seed(s): rule 4 needs at least "
                                    f"{min_seeds(config.device)}")
    elif any(r["stopped_by_clock"] for r in table.values()):
        outcome = Outcome.undecided("runs stopped by the clock before the end of their schedule")
    else:
        outcome = Outcome(PASS, f"all {runs} runs reached it")
    return Claim("all-reach", statement, value, "==", 1.0, outcome)


def claims(config: Config, results: dict[str, Any]) -> list[Claim]:
    """``all-finite``, ``all-reach`` (where the task expects it), the rankings at the primary
    target and at each published extra target, and the peer comparisons."""
    table = results["optimizers"]
    not_finite = sum(r["nonfinite_runs"] for r in table.values())
    out = [Claim("all-finite", "every run's loss, metrics and weights stayed finite (value: "
                 "runs that did not)", float(not_finite), "==", 0.0)]
    if config.workload.all_reach:
        out.append(all_reach_claim(config, table, results["targets"]["primary"]))
    primary = results["targets"]["primary"]
    rc, notes = ranking_claims(config, table, "target", primary["text"])
    for label in results.get("extra_targets", []):
        more, _ = ranking_claims(config, table, label, results["targets"][label]["text"],
                                 suffix=f" [{label} target]")
        rc += more
    results["ranking_notes"] = notes
    return out + rc + peer_claims(config, table)


def _oriented(values: list[float], maximize: bool) -> list[float]:
    """Scores turned into lower-is-better values (NaN stays NaN: a diverged seed)."""
    return [-v if maximize else v for v in values]


def peer_claims(config: Config, table: dict[str, dict[str, Any]]) -> list[Claim]:
    """Our implementation against each other library's implementation of the same algorithm
    that ran, statistic for statistic (rule 9): the optimizer step time, and the final score on
    the task's metric (the one its target is set on), each median against median and decided
    by the paired seed test. Both sides run at their library's defaults on the defaults track,
    and at the best of the same learning-rate multipliers on the tuned track (``--lr-sweep``).

    The metric, not the validation loss, because the loss misjudges classifiers that overfit:
    on MNIST-1D our Muon's test loss climbs from 0.96 to 2.1 while its accuracy rises to 0.69,
    and a peer that barely trains at its default learning rate keeps a lower loss.
    """
    w = config.workload
    minimum = min_seeds(config.device)
    out = []
    for name, row in table.items():
        peer = peer_lib.PEERS.get(name)
        if peer is None or not peer.same_algorithm or peer.counterpart not in table:
            continue
        ours_name = peer.counterpart
        ours = table[ours_name]
        mine = Side.of(ours_name, ours["opt_step_ms"]["per_seed"])
        theirs = Side.of(name, row["opt_step_ms"]["per_seed"])
        out.append(Claim(
            f"peer-speed: {ours_name} vs {name}",
            f"our {ours_name}'s optimizer step is faster than {peer.qualname}'s beyond the seed "
            "spread (value: our median step time / theirs)",
            _ratio(mine.median, theirs.median), "<", 1.0,
            compare(mine, theirs, "<", minimum, "a step time"),
        ))
        mine_q = Side.of(ours_name, _oriented(ours["final_metric"]["per_seed"], w.maximize))
        theirs_q = Side.of(name, _oriented(row["final_metric"]["per_seed"], w.maximize))
        out.append(Claim(
            f"peer-quality: {ours_name} vs {name}",
            f"our {ours_name}'s final {w.metric} is no worse than {peer.qualname}'s, median "
            "against median (value: ours / theirs, oriented so that <= 1 is no worse)",
            _no_worse(ours["final_metric"]["median"], row["final_metric"]["median"],
                      w.maximize),
            "<=", 1.0,
            compare(mine_q, theirs_q, "<=", minimum, "a finite score"),
        ))
    return out


def _ratio(a: float, b: float) -> float | None:
    """``a / b``; ``None`` when ours is not finite, 0 when only theirs is not."""
    if not math.isfinite(a):
        return None
    return a / b if b and math.isfinite(b) else 0.0


def _no_worse(mine: float | None, theirs: float | None, maximize: bool) -> float | None:
    """``mine / theirs`` (``theirs / mine`` when larger is better): <= 1 when ``mine`` is no
    worse; ``None`` when ours is missing or not finite, 0 when only theirs is."""
    if mine is None or not math.isfinite(mine):
        return None
    if theirs is None or not math.isfinite(theirs):
        return 0.0
    num, den = (theirs, mine) if maximize else (mine, theirs)
    if den > 0:
        return num / den
    return 1.0 if num <= den else math.inf


__all__ = [
    "BASELINE",
    "MIN_SEEDS_CPU",
    "MIN_SEEDS_GPU",
    "Side",
    "Z_SPREAD",
    "all_reach_claim",
    "beats",
    "claims",
    "clears_spread",
    "compare",
    "conjunction",
    "min_seeds",
    "peer_claims",
    "ranking_claims",
]
