"""The claims of ``linear-representation`` (EXPERIMENTS.md §1), judged from ``summary.json``.

Thresholds are the protocol's, fixed before any run. Each claim is judged over the cells and
methods this run has; a claim whose method or cell was not run is left out, not failed. When a
run's grid differs from the protocol's (``--quick``: fewer cells, a shorter budget), the claim is
scaled to this run's cells and its statement says so.

Steps-to-0.1 are censored: a median that missed the budget counts ``steps + 1``, which is a lower
bound of the true count. A ratio built from one is a bound too, so it decides a claim only in
the direction the bound allows (a growth of at least 2.5 cannot show "at least 10x", nor refute
it: UNDECIDED); a ratio with a censored denominator decides nothing. Missing numbers (a method
that blew up in most seeds) are UNDECIDED, never PASS.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from guided_descent.experiments.linear_representation_runs import REACHED, cell_key
from guided_descent.experiments.records import FAIL, PASS, Claim, Outcome

# The protocol's constants (EXPERIMENTS.md §1), fixed before any run.
CLAIM1_MAX_STEPS = 50
CLAIM1_MAX_SPREAD = 2.0
CLAIM2_SGD_GROWTH = 10.0
CLAIM2_SGD_DIST = 0.3
CLAIM2_LAYERWISE_DIST = 0.05
CLAIM3_DIST_RATIO = 3.0
CLAIM3_STEPS_RATIO = 5.0
CLAIM5_TOLERANCE = 1e-8
CLAIM6_RATIO = 0.5
# Where the claims look: κ_x = 1 and 100, and the hard cell (100, 10).
CLAIM_KX_LOW, CLAIM_KX_HIGH, CLAIM_KF_HARD = 1.0, 100.0, 10.0
# The protocol's grid of (κ_x, κ_F) cells, which claim 1 is stated over.
PROTOCOL_KAPPA_X = (1.0, 10.0, 100.0, 1000.0)
PROTOCOL_KAPPA_F = (1.0, 10.0)


def _cell(
    results: Mapping[str, Any], method: str, kx: float, kf: float
) -> Mapping[str, Any] | None:
    m = results["methods"].get(method)
    if m is None:
        return None
    return m["cells"].get(cell_key(kx, kf))


def _kappas(results: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    cells = results["cells"]
    return (
        sorted({c["kappa_x"] for c in cells}),
        sorted({c["kappa_f"] for c in cells}),
    )


def _median_of(values: Sequence[float | None], missing: float) -> float:
    return float(statistics.median([missing if v is None else v for v in values]))


def _grid_note(results: Mapping[str, Any]) -> str:
    """`` over this run's cells ... (the protocol's: ...)`` when the grid is not the protocol's."""
    kxs, kfs = _kappas(results)
    if tuple(kxs) == PROTOCOL_KAPPA_X and tuple(kfs) == PROTOCOL_KAPPA_F:
        return ""
    fmt = ", ".join
    return (f"; over this run's cells κ_x ∈ {{{fmt(f'{k:g}' for k in kxs)}}} × κ_F ∈ "
            f"{{{fmt(f'{k:g}' for k in kfs)}}} (the protocol's: κ_x ∈ {{1, 10, 100, 1000}} × "
            "κ_F ∈ {1, 10})")


def _ratio_of_counts(num: float | None, den: float | None, budget: int, op: str,
                     threshold: float) -> tuple[float | None, Outcome | None]:
    """``num / den`` of two median steps-to-0.1 and, when either is censored (a miss counts
    ``budget + 1``), the outcome the bound allows: ``None`` lets the comparison decide."""
    if num is None or den is None or den <= 0:
        return None, None
    value = num / den
    if den > budget:
        return value, Outcome.undecided(
            f"the denominator's median missed the {budget}-step budget: no ratio can be read")
    if num > budget:
        # A lower bound of the ratio: it can show "at least" (or refute "at most"), no more.
        holds = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold,
                 "<": value < threshold}[op]
        if op in (">=", ">") and holds:
            return value, Outcome(PASS, f"a lower bound {value:.3g} (the numerator's median "
                                  f"missed the budget) already clears {op} {threshold:g}")
        if op in ("<=", "<") and not holds:
            return value, Outcome(FAIL, f"a lower bound {value:.3g} (the numerator's median "
                                  f"missed the budget) already fails {op} {threshold:g}")
        return value, Outcome.undecided(
            f"{value:.3g} is only a lower bound (the numerator's median missed the {budget}-step "
            f"budget); it cannot decide {op} {threshold:g}")
    return value, None


def gauss_newton_verdicts(results: Mapping[str, Any], damping: float) -> list[dict[str, Any]]:
    """Per cell, claim 4's two conditions: Gauss–Newton at its best damping needs more median
    steps than the layer-wise rule; or, at the layer-wise rule's own damping, its median run
    fails (blows up or never reaches 0.1)."""
    out = []
    for c in results["cells"]:
        kx, kf = c["kappa_x"], c["kappa_f"]
        gn, lw = _cell(results, "gauss_newton", kx, kf), _cell(results, "layerwise", kx, kf)
        if gn is None or lw is None:
            continue
        slower = gn["median_steps"] > lw["median_steps"]
        same = [e for e in gn["grid"] if e["hyper"] == damping]
        unstable = None
        if same:
            # A seed fails if it never reached 0.1 or blew up at any point. The run at this
            # damping is exempt from the race (see make_runs), so no seed is "stopped".
            entry = same[0]
            fails = sum(
                st != REACHED or dv is not None
                for st, dv in zip(entry["status"], entry["diverged_at"], strict=True)
            )
            unstable = fails >= len(entry["status"]) / 2
        out.append(
            {
                "kappa_x": kx,
                "kappa_f": kf,
                "gn_steps": gn["median_steps"],
                "gn_damping": gn["hyper"],
                "layerwise_steps": lw["median_steps"],
                "slower": slower,
                "unstable_at_layerwise_damping": unstable,
                "holds": slower or bool(unstable),
            }
        )
    return out


def claims(results: Mapping[str, Any]) -> list[Claim]:
    """The protocol's claims that the run can evaluate (a claim whose method or cell was not run
    is left out, not failed)."""
    out: list[Claim] = []
    kxs, kfs = _kappas(results)
    budget = results["steps"]
    at = results["compare_at"]
    grid = _grid_note(results)
    lw_cells = [_cell(results, "layerwise", c["kappa_x"], c["kappa_f"]) for c in results["cells"]]
    if all(c is not None for c in lw_cells):
        med = [c["median_steps"] for c in lw_cells]  # type: ignore[index]
        steps_outcome = None
        if max(med) > budget and budget < CLAIM1_MAX_STEPS:
            steps_outcome = Outcome.undecided(
                f"a median missed the {budget}-step budget, shorter than the {CLAIM1_MAX_STEPS} "
                "steps the claim allows")
        out.append(
            Claim(
                "1_layerwise_steps",
                "layer-wise preconditioned sweep: the largest median steps-to-0.1 over all "
                f"(κ_x, κ_F) cells (a run that misses counts steps + 1){grid}",
                max(med),
                "<=",
                CLAIM1_MAX_STEPS,
                steps_outcome,
            )
        )
        value, outcome = _ratio_of_counts(max(med), min(med), budget, "<", CLAIM1_MAX_SPREAD)
        out.append(
            Claim(
                "1_layerwise_spread",
                "layer-wise preconditioned sweep: largest / smallest median steps-to-0.1 over "
                f"the cells{grid}",
                value,
                "<",
                CLAIM1_MAX_SPREAD,
                outcome,
            )
        )
    if CLAIM_KX_LOW in kxs and CLAIM_KX_HIGH in kxs:
        # The smaller growth over κ_F decides; a censored one is a bound (see the module doc).
        judged: list[tuple[float | None, Outcome | None]] = []
        for kf in kfs:
            lo = _cell(results, "sgd", CLAIM_KX_LOW, kf)
            hi = _cell(results, "sgd", CLAIM_KX_HIGH, kf)
            if lo is not None and hi is not None:
                judged.append(_ratio_of_counts(hi["median_steps"], lo["median_steps"], budget,
                                               ">=", CLAIM2_SGD_GROWTH))
        if judged:
            value, outcome = min(judged, key=lambda j: math.inf if j[0] is None else j[0])
            if any(o is not None and o.verdict != PASS for _, o in judged) and (
                    outcome is None or outcome.verdict == PASS):
                # Another κ_F's growth is censored and undecided: the claim is over all of them.
                outcome = next(o for _, o in judged if o is not None and o.verdict != PASS)
            out.append(
                Claim(
                    "2_sgd_kappa_growth",
                    "SGD (best lr per cell): median steps-to-0.1 at κ_x = 100 over those at "
                    f"κ_x = 1, the smaller over κ_F (a median that misses counts {budget + 1}, "
                    "a lower bound: the ratio then decides only if it already clears 10)",
                    value,
                    ">=",
                    CLAIM2_SGD_GROWTH,
                    outcome,
                )
            )
    sgd = _cell(results, "sgd", CLAIM_KX_HIGH, CLAIM_KF_HARD)
    lw = _cell(results, "layerwise", CLAIM_KX_HIGH, CLAIM_KF_HARD)
    adam = _cell(results, "adam", CLAIM_KX_HIGH, CLAIM_KF_HARD)
    where = f"at κ_x = 100, κ_F = 10 after {at} steps"
    if sgd is not None:
        out.append(
            Claim(
                "2_sgd_dist",
                f"SGD: median subspace distance {where}",
                sgd["median_dist_compare"],
                ">=",
                CLAIM2_SGD_DIST,
            )
        )
    if lw is not None:
        out.append(
            Claim(
                "2_layerwise_dist",
                f"layer-wise preconditioned sweep: median subspace distance {where}",
                lw["median_dist_compare"],
                "<=",
                CLAIM2_LAYERWISE_DIST,
            )
        )
    if adam is not None and lw is not None:
        a, b = adam["median_dist_compare"], lw["median_dist_compare"]
        out.append(
            Claim(
                "3_adam_dist_ratio",
                f"Adam's median distance over the layer-wise sweep's, {where}",
                a / b if a is not None and b else None,
                ">=",
                CLAIM3_DIST_RATIO,
            )
        )
        value, outcome = _ratio_of_counts(adam["median_steps"], lw["median_steps"], budget, ">",
                                          CLAIM3_STEPS_RATIO)
        out.append(
            Claim(
                "3_adam_steps_ratio",
                "Adam's median steps-to-0.1 over the layer-wise sweep's at κ_x = 100, κ_F = 10 "
                f"(a median that misses counts {budget + 1}, a lower bound)",
                value,
                ">",
                CLAIM3_STEPS_RATIO,
                outcome,
            )
        )
    verdicts = results.get("gauss_newton_verdicts")
    if verdicts:
        out.append(
            Claim(
                "4_gauss_newton",
                "cells where full Gauss–Newton (best damping) needs no more median steps-to-0.1 "
                "than the layer-wise sweep AND is stable at the layer-wise damping (median run "
                f"reaches 0.1); the claim wants none{grid}",
                float(sum(not v["holds"] for v in verdicts)),
                "<=",
                0.0,
            )
        )
    if "als_relative_error" in results:
        out.append(
            Claim(
                "5_als_equivalence",
                "one layer-wise sweep (η = 1, P_G = FᵀF, λ = 0, full batch) against alternating "
                "least squares: relative error in float64 (also a unit test)",
                results["als_relative_error"],
                "<=",
                CLAIM5_TOLERANCE,
            )
        )
    transfer_ratios: list[float | None] = []
    for kf in kfs:
        lw_t = _cell(results, "layerwise", CLAIM_KX_HIGH, kf)
        sgd_t = _cell(results, "sgd", CLAIM_KX_HIGH, kf)
        if lw_t is not None and sgd_t is not None:
            lw_ex = _median_of(lw_t["transfer_excess"], math.inf)
            sgd_ex = _median_of(sgd_t["transfer_excess"], math.inf)
            # SGD's number missing (its G blew up in most seeds): nothing to compare against.
            transfer_ratios.append(None if math.isinf(sgd_ex) else (
                lw_ex / sgd_ex if sgd_ex > 0 else math.inf))
    if transfer_ratios:
        out.append(
            Claim(
                "6_transfer",
                f"transfer at κ_x = 100 (G taken after {at} steps): median excess risk of the "
                "layer-wise G over SGD's, the larger over κ_F",
                None if None in transfer_ratios else max(transfer_ratios),  # type: ignore[type-var]
                "<=",
                CLAIM6_RATIO,
            )
        )
    return out


# Claims that do not depend on seeds (a float64 identity): decided even from one seed.
SEED_FREE = ("5_als_equivalence",)

__all__ = [
    "CLAIM_KF_HARD",
    "CLAIM_KX_HIGH",
    "CLAIM_KX_LOW",
    "SEED_FREE",
    "claims",
    "gauss_newton_verdicts",
]
