"""The claims of ``mup`` (EXPERIMENTS.md §5), from the coordinate checks and the sweeps.

A learning-rate shift is measured only when both widths' best rates lie inside the grid: a best
rate at an end of the grid may not be the best one, so such a shift is UNDECIDED.
"""

from __future__ import annotations

from typing import Any

from guided_descent.experiments.records import Claim, Outcome

# Thresholds of the claims, fixed before any run. EXPERIMENTS.md section 5: under μP each layer's
# activation scale varies < 2x across widths, and the best learning rate moves by at most one
# grid step (2x) from the smallest to the largest width, "and by more under SP". That SP *grows*
# is checked as the mirror of the μP bound (ours): some layer is >= 2x larger at the widest
# width than at the narrowest.
FLAT_BOUND = 2.0
GROWTH_BOUND = 2.0
MAX_MUP_SHIFT = 1.0  # in grid steps of 2x, i.e. log2 units


def _label(model_optimizer: str) -> str:
    model_name, optimizer = model_optimizer.split("/")
    return f"{model_name.upper()} + {optimizer}"


def _at_edge(summary: dict[str, Any]) -> Outcome | None:
    """The best learning rate at an end of the grid may not be the best one: the optimum can
    lie outside, so the shift between widths is not measured (UNDECIDED)."""
    edge = [w for w, at in summary.get("best_at_grid_edge", {}).items() if at]
    if not edge:
        return None
    return Outcome.undecided(
        f"the best learning rate sits at the edge of the grid at width {', '.join(edge)}: the "
        "optimum may lie outside it, so the shift is not measured (widen --lr-exponents)"
    )


def claims(
    coord: dict[str, dict[str, Any]], transfer: dict[str, dict[str, Any]], narrow: int, wide: int
) -> list[Claim]:
    """The claims of section 5, computed from the coordinate checks and the sweeps."""
    out = []
    for label, by_param in coord.items():
        slug = label.replace("/", "_")
        out.append(
            Claim(
                name=f"coord_mup_flat_{slug}",
                statement=(
                    f"{_label(label)}, μP: every layer's mean |activation| (late coordinate-check "
                    f"steps, mean over seeds) varies less than {FLAT_BOUND:g}x across widths "
                    f"{narrow}..{wide} (value: the largest max/min ratio over layers, at "
                    f"{by_param['mup']['worst_spread_layer']})"
                ),
                value=by_param["mup"]["worst_spread"],
                op="<",
                threshold=FLAT_BOUND,
            )
        )
        out.append(
            Claim(
                name=f"coord_sp_grows_{slug}",
                statement=(
                    f"{_label(label)}, SP: some layer's mean |activation| (late coordinate-check "
                    f"steps, mean over seeds) is at least {GROWTH_BOUND:g}x larger at width {wide} "
                    f"than at width {narrow} (value: the largest ratio, at "
                    f"{by_param['sp']['max_growth_layer']})"
                ),
                value=by_param["sp"]["max_growth"],
                op=">=",
                threshold=GROWTH_BOUND,
            )
        )
    for name, by_param in transfer.items():
        out.append(
            Claim(
                name=f"transfer_mup_{name}",
                statement=(
                    f"MLP + {name}, μP: the best learning rate moves by at most "
                    f"{MAX_MUP_SHIFT:g} grid step (2x) from width {narrow} to width {wide} "
                    "(value: |log2 of the ratio of the best learning rates|)"
                ),
                value=float(by_param["mup"]["abs_shift"]),
                op="<=",
                threshold=MAX_MUP_SHIFT,
                outcome=_at_edge(by_param["mup"]),
            )
        )
        out.append(
            Claim(
                name=f"transfer_sp_{name}",
                statement=(
                    f"MLP + {name}, SP: the best learning rate moves by more than "
                    f"{MAX_MUP_SHIFT:g} grid step from width {narrow} to width {wide} (value: "
                    "|log2 of the ratio of the best learning rates|)"
                ),
                value=float(by_param["sp"]["abs_shift"]),
                op=">",
                threshold=MAX_MUP_SHIFT,
                outcome=_at_edge(by_param["sp"]),
            )
        )
    return out


__all__ = ["FLAT_BOUND", "GROWTH_BOUND", "MAX_MUP_SHIFT", "claims"]
