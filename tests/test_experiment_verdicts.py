"""Every experiment's claims are tri-state: missing evidence is UNDECIDED, never PASS or FAIL.

Hand-made results for each experiment's ``claims``: a NaN, one seed, a censored count (a run that
missed its budget counts ``budget + 1``, a bound, not a value), an optimum at the edge of the
grid. Finding 7 of issue 14: ``run linear-representation --quick`` reported FAIL for
``2_sgd_kappa_growth`` from such a bound.
"""

from __future__ import annotations

import math

from guided_descent.experiments import linear_representation as lr
from guided_descent.experiments import moons, quadratic
from guided_descent.experiments import mup as mup_exp
from guided_descent.experiments.records import FAIL, PASS, UNDECIDED, Claim, require_seeds

# ---- linear-representation -------------------------------------------------------------------


def lr_results(sgd_steps: tuple[float, float], lw_steps: float = 5.0, adam_steps: float = 80.0,
               budget: int = 300, sgd_transfer: float | None = 1.0) -> dict:
    """Cells (κ_x, κ_F) = (1, 10) and (100, 10); per method the medians the claims read."""
    def cell(steps: float, dist: float, transfer: float | None) -> dict:
        return {"median_steps": steps, "median_dist_compare": dist,
                "transfer_excess": [transfer, transfer]}

    return {
        "cells": [{"kappa_x": 1.0, "kappa_f": 10.0}, {"kappa_x": 100.0, "kappa_f": 10.0}],
        "methods": {
            "sgd": {"cells": {"1,10": cell(sgd_steps[0], 0.05, 0.1),
                              "100,10": cell(sgd_steps[1], 0.7, sgd_transfer)}},
            "layerwise": {"cells": {"1,10": cell(lw_steps, 0.01, 0.01),
                                    "100,10": cell(lw_steps, 0.02, 0.01)}},
            "adam": {"cells": {"1,10": cell(adam_steps, 0.1, 0.1),
                               "100,10": cell(adam_steps, 0.3, 0.1)}},
        },
        "steps": budget,
        "compare_at": 200,
        "seeds": 2,
    }


def lr_claims(results: dict) -> dict[str, Claim]:
    return {c.name: c for c in lr.claims(results)}


def test_sgd_growth_from_a_censored_count_is_undecided_not_fail():
    """Finding 7: at κ_x = 100 SGD misses the 300-step budget (301 = a lower bound), so
    301 / 120 = 2.5 only says the growth is at least 2.5."""
    got = lr_claims(lr_results((120.0, 301.0)))["2_sgd_kappa_growth"]
    assert got.verdict == UNDECIDED and "lower bound" in got.reason
    # A bound that already clears the threshold decides it.
    assert lr_claims(lr_results((20.0, 301.0)))["2_sgd_kappa_growth"].verdict == PASS
    assert lr_claims(lr_results((20.0, 100.0)))["2_sgd_kappa_growth"].verdict == FAIL
    both = lr_claims(lr_results((301.0, 301.0)))["2_sgd_kappa_growth"]
    assert both.verdict == UNDECIDED


def test_adam_steps_ratio_with_censored_counts():
    # The layer-wise sweep missing too: no ratio can be read.
    assert lr_claims(lr_results((20.0, 301.0), lw_steps=301.0))[
        "3_adam_steps_ratio"].verdict == UNDECIDED
    # Adam missing: 301 / 5 > 5 is a lower bound that clears it.
    assert lr_claims(lr_results((20.0, 301.0), adam_steps=301.0))[
        "3_adam_steps_ratio"].verdict == PASS
    got = lr_claims(lr_results((20.0, 301.0), lw_steps=100.0, adam_steps=301.0))
    assert got["3_adam_steps_ratio"].verdict == UNDECIDED


def test_layerwise_steps_missing_is_a_fail_only_when_the_budget_covers_the_bound():
    assert lr_claims(lr_results((20.0, 301.0), lw_steps=301.0))[
        "1_layerwise_steps"].verdict == FAIL
    short = lr_results((20.0, 31.0), lw_steps=31.0, budget=30)
    assert lr_claims(short)["1_layerwise_steps"].verdict == UNDECIDED


def test_transfer_without_sgds_number_is_undecided():
    got = lr_claims(lr_results((20.0, 301.0), sgd_transfer=None))["6_transfer"]
    assert got.verdict == UNDECIDED


def test_claims_over_a_reduced_grid_say_so():
    got = lr_claims(lr_results((20.0, 301.0)))
    assert "this run's cells" in got["1_layerwise_steps"].statement
    assert "protocol" in got["1_layerwise_steps"].statement


# ---- moons ------------------------------------------------------------------------------------


def moons_cells(test_acc: dict[str, float]) -> dict:
    def stat(v: float) -> dict:
        return {"median": v, "min": v, "max": v, "per_seed": [v, v, v]}

    return {n: {"32": {"movement": stat(0.5), "test_acc": stat(0.9)},
                "8192": {"movement": stat(0.1), "test_acc": stat(a)}}
            for n, a in test_acc.items()}


def test_moons_a_diverged_optimizer_is_not_skipped_by_the_minimum():
    """min() over medians skipped a NaN that was not first, so the claim could PASS while an
    optimizer had diverged."""
    cells = moons_cells({"adam": 0.9, "sgd": math.nan})
    got = {c.name: c for c in moons.claims(cells, ["adam", "sgd"], 32, 8192)}
    assert got["lazy_test_accuracy"].verdict == UNDECIDED
    assert "sgd" in got["lazy_test_accuracy"].reason


def test_one_seed_makes_claims_over_seeds_undecided():
    claims = [Claim("a", "s", 0.5, "<", 1.0), Claim("5_als_equivalence", "s", 0.0, "<=", 1e-8)]
    got = require_seeds(claims, 1, exempt=("5_als_equivalence",))
    assert [c.verdict for c in got] == [UNDECIDED, PASS]


# ---- quadratic ---------------------------------------------------------------------------------


def test_quadratic_slope_from_unreached_runs_is_undecided():
    methods = {"sgd": {"slope": 0.7, "unreached": 2}, "momentum": {"slope": 0.5, "unreached": 0},
               "newton": {"iterations": [[1, 1]], "unreached": 0}}
    got = {c.name: c for c in quadratic.claims(methods)}
    assert got["gd_slope"].verdict == UNDECIDED and "2 run" in got["gd_slope"].reason
    assert got["heavy_ball_slope"].verdict == PASS
    assert got["newton_one_step"].verdict == PASS


# ---- mup ---------------------------------------------------------------------------------------


def test_mup_transfer_with_the_best_rate_at_the_grid_edge_is_undecided():
    coord = {"mlp/adam": {
        "sp": {"worst_spread": 3.0, "max_growth": 3.0, "worst_spread_layer": "h",
               "max_growth_layer": "h"},
        "mup": {"worst_spread": 1.2, "max_growth": 1.2, "worst_spread_layer": "h",
                "max_growth_layer": "h"}}}
    inside = {"best_at_grid_edge": {"64": False, "1024": False}}
    edge = {"best_at_grid_edge": {"64": False, "1024": True}}
    transfer = {"adam": {"sp": {"abs_shift": 3, **edge}, "mup": {"abs_shift": 0, **inside}}}
    got = {c.name: c for c in mup_exp.claims(coord, transfer, 64, 1024)}
    assert got["transfer_mup_adam"].verdict == PASS
    assert got["transfer_sp_adam"].verdict == UNDECIDED
    assert "edge" in got["transfer_sp_adam"].reason
