"""The words of a ``moons`` report: how numbers are written, and the discussion, computed from
the numbers (nothing here is written before seeing them)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guided_descent.experiments.moons import LECTURE_NAMES, TABLE_METRICS
from guided_descent.experiments.records import FAIL, UNDECIDED, claim_verdict
from guided_descent.report import markdown as md

_METRIC_LABELS = {
    "train_loss": "train loss",
    "test_loss": "test loss",
    "train_acc": "train acc",
    "test_acc": "test acc",
}


def _label(name: str) -> str:
    return LECTURE_NAMES.get(name, name)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _value(metric: str, x: Any) -> str:
    """A loss with 3 decimals, an accuracy as a percentage with one decimal (as the lecture)."""
    if not _is_num(x):
        return "-"
    return f"{100 * x:.1f}%" if metric.endswith("acc") else f"{x:.3f}"


def _ours(metric: str, s: Mapping[str, Any]) -> str:
    """median [min-max] over seeds, accuracies in percent."""
    if not _is_num(s.get("median")):
        return "diverged"
    if metric.endswith("acc"):
        return f"{100 * s['median']:.1f}% [{100 * s['min']:.1f}–{100 * s['max']:.1f}]"
    return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def _points(x: float) -> str:
    """An accuracy difference in percentage points."""
    return f"{100 * x:.1f}" if _is_num(x) else "-"


def _names(names: Sequence[str]) -> str:
    labels = [_label(n) for n in names]
    if len(labels) <= 1:
        return "".join(labels)
    return ", ".join(labels[:-1]) + " and " + labels[-1]



def _late_jump(metrics: list[dict[str, Any]], name: str, width: int) -> float | None:
    """How far the full-train loss still jumps up in the second half of training.

    Per seed, the largest ratio of one logged train loss to the one before it over the second
    half of the logged steps; the median over seeds. About 1 for a run that has settled.
    """
    runs: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in metrics:
        if r.get("event") == "eval" and r["optimizer"] == name and r["width"] == width:
            if _is_num(r.get("train_loss")):
                runs[r["seed"]].append((r["step"], r["train_loss"]))
    jumps = []
    for rows in runs.values():
        losses = [loss for _, loss in sorted(rows)]
        late = losses[len(losses) // 2 :]
        ratios = [b / a for a, b in zip(late, late[1:], strict=False) if a > 0]
        if ratios:
            jumps.append(max(ratios))
    return float(np.median(jumps)) if jumps else None


def discussion(
    summary: Mapping[str, Any], config: Mapping[str, Any], metrics: list[dict[str, Any]]
) -> list[str]:
    """Paragraphs computed from the numbers; nothing here is written before seeing them."""
    res = summary["results"]
    claims = summary["claims"]
    cells = res["cells"]
    optimizers: list[str] = res["optimizers"]
    small, wide = res["small_width"], res["wide_width"]
    cmp = res["lecture"]
    out = []

    failed = [c["name"] for c in claims if claim_verdict(c) == FAIL]
    open_ = [c["name"] for c in claims if claim_verdict(c) == UNDECIDED]
    out.append(
        f"{md.claims_line(claims)}"
        + (f" Failing: {', '.join(failed)}." if failed else "")
        + (f" Undecided: {', '.join(open_)}." if open_ else "")
    )

    # Lazy training.
    ratios = {}
    for name in optimizers:
        a = cells[name][str(small)]["movement"]["median"]
        b = cells[name][str(wide)]["movement"]["median"]
        if _is_num(a) and _is_num(b) and b > 0:
            ratios[name] = a / b
    if ratios:
        lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)

        def acc_range(width: int) -> str:
            accs = [cells[n][str(width)]["train_acc"]["median"] for n in optimizers]
            accs = [a for a in accs if _is_num(a)]
            return f"{_value('train_acc', min(accs))}–{_value('train_acc', max(accs))}"

        span = (
            f"{ratios[lo]:.2f} ({_label(lo)})"
            if lo == hi
            else f"{ratios[lo]:.2f} ({_label(lo)}) to {ratios[hi]:.2f} ({_label(hi)})"
        )
        text = (
            f"*Lazy training.* From width {small} to width {wide} the first layer's median "
            f"relative movement shrinks by a factor of {span}, while the median train accuracies "
            f"go from {acc_range(small)} to {acc_range(wide)}"
        )
        if min(ratios.values()) > 1:
            text += (
                ": the wide network fits the data with first-layer weights that stay closer to "
                "where they started."
            )
        else:
            stuck = [n for n, r in ratios.items() if r <= 1]
            text += f"; for {_names(stuck)} the wide network's first layer does not move less."
        out.append(text)

    # Accuracy differences against seed noise, per regime (a ranking needs two optimizers).
    for regime, r in cmp["best"].items() if len(optimizers) > 1 else ():
        width = cmp["widths"]["ours"][regime]
        if not (_is_num(r["median_range"]) and _is_num(r["typical_seed_range"])):
            out.append(
                f"*Width {width} ({regime}).* At least one optimizer diverged on some seed, so "
                "its median is undefined and the optimizers are not ranked at this width."
            )
            continue
        beyond_noise = r["median_range"] > r["typical_seed_range"]
        spread_words = "larger than" if beyond_noise else "no larger than"
        text = (
            f"*Width {width} ({regime}).* Median test accuracies run from "
            f"{_value('test_acc', r['worst_test_acc'])} ({_names(r['worst'])}) to "
            f"{_value('test_acc', r['best_test_acc'])} ({_names(r['best'])}), a range of "
            f"{_points(r['median_range'])} points, {spread_words} the typical seed range of one "
            f"optimizer ({_points(r['typical_seed_range'])} points)."
        )
        if "gap" in r and len(r["best"]) > 1:
            text += (
                f" {len(r['best'])} optimizers share the top median, so there is no single best; "
                f"on the same data and initialisation {_label(r['best'][0])} beats "
                f"{_label(r['best'][1])} outright on {r['paired_wins']} of {r['paired_seeds']} "
                "seeds."
            )
        elif "gap" in r:
            verdict = "exceeds" if r["gap_exceeds_spread"] else "does not exceed"
            text += (
                f" The leader's margin over the runner-up ({_label(r['runner_up'])}) is "
                f"{_points(r['gap'])} points and {verdict} their seed spread "
                f"({_points(r['spread'])} points); on the same data and initialisation the "
                f"leader wins outright on {r['paired_wins']} of {r['paired_seeds']} seeds."
            )
        if r.get("lecture_best"):
            lb, lw = r["lecture_best"], r["lecture_worst"]
            ours_lb = cells[lb][str(width)]["test_acc"]["median"]
            ours_lw = cells[lw][str(width)]["test_acc"]["median"]
            if r["best_agrees"]:
                agree = "is among our leaders"
            else:
                agree = f"trails our top median by {_points(r['best_test_acc'] - ours_lb)} points"
            lecture = cmp["in_range"]
            text += (
                f" The lecture's best here, {_label(lb)} "
                f"({_value('test_acc', lecture[lb][regime]['test_acc']['lecture'])} there), "
                f"{agree} (ours: {_value('test_acc', ours_lb)}); its weakest, {_label(lw)} "
                f"({_value('test_acc', lecture[lw][regime]['test_acc']['lecture'])} there), "
                f"scores {_value('test_acc', ours_lw)} with us"
                + (" and is among our weakest." if r["worst_agrees"] else ".")
            )
        if not beyond_noise:
            text += (
                " At this width the choice of optimizer matters less than the draw of the "
                "data set: the ranking is within seed noise."
            )
        else:
            rest = [n for n in optimizers if n not in r["worst"]]
            meds = [cells[n][str(width)]["test_acc"]["median"] for n in rest]
            meds = [m for m in meds if _is_num(m)]
            if len(meds) >= 2 and max(meds) - min(meds) <= r["typical_seed_range"]:
                text += (
                    f" Apart from {_names(r['worst'])}, the optimizers span "
                    f"{_points(max(meds) - min(meds))} points, within seed noise."
                )
        out.append(text)

    # Cells whose final train loss is far above the others at the same width.
    for width in (small, wide):
        losses = {n: cells[n][str(width)]["train_loss"]["median"] for n in optimizers}
        accs = {n: cells[n][str(width)]["train_acc"]["median"] for n in optimizers}
        finite = [v for v in losses.values() if _is_num(v)]
        if len(finite) < 2:
            continue
        typical_loss = float(np.median(finite))
        typical_acc = float(np.median([v for v in accs.values() if _is_num(v)]))
        for name in optimizers:
            loss, acc = losses[name], accs[name]
            if not _is_num(loss):
                out.append(f"*{_label(name)} at width {width}* diverged on at least one seed.")
                continue
            if loss <= 1.5 * typical_loss:
                continue
            spread = cells[name][str(width)]["train_loss"]
            if _is_num(acc) and acc >= typical_acc - 0.02:
                jump = _late_jump(metrics, name, width)
                if jump is not None and jump > 1.5:
                    why = (
                        f"It has not settled: in the second half of training its full-train loss "
                        f"still rises up to {jump:.1f}x from one evaluation to the next (median "
                        "over seeds), as a step size too large for this width would make it"
                    )
                else:
                    why = "The loss is carried by a few confidently misclassified points"
                out.append(
                    f"*{_label(name)} at width {width}* ends with a median train loss of "
                    f"{loss:.3f} (seeds {spread['min']:.3f}–{spread['max']:.3f}; typical at this "
                    f"width {typical_loss:.3f}) at a normal train accuracy "
                    f"({_value('train_acc', acc)}). {why}."
                )
            else:
                out.append(
                    f"*{_label(name)} at width {width}* fits the training set worse than the "
                    f"rest (median train loss {loss:.3f} vs {typical_loss:.3f} typical, train "
                    f"accuracy {_value('train_acc', acc)} vs {_value('train_acc', typical_acc)})"
                    f": with its default step size it has not converged in "
                    f"{config.get('steps', '?')} steps."
                )

    # Adam against AdamW: with lr 1e-3 and weight decay 0.01 the decay shrinks the weights by a
    # factor (1 - 1e-5) per step, so the two should be near-identical on the same seed.
    if "adam" in optimizers and "adamw" in optimizers:
        diffs = [
            abs(x - y)
            for w in (small, wide)
            for x, y in zip(
                cells["adam"][str(w)]["test_acc"]["per_seed"],
                cells["adamw"][str(w)]["test_acc"]["per_seed"],
                strict=True,
            )
            if _is_num(x) and _is_num(y)
        ]
        inr = cmp["in_range"]
        lecture_gaps = (
            [
                abs(inr["adam"][r]["test_acc"]["lecture"] - inr["adamw"][r]["test_acc"]["lecture"])
                for r in ("small", "lazy")
            ]
            if "adam" in inr and "adamw" in inr
            else []
        )
        hp = res.get("hyperparams", {}).get("adamw", {})
        if diffs:
            text = (
                f"*Adam and AdamW* differ by at most {_points(max(diffs))} points of test "
                "accuracy on any seed at either width"
            )
            if "weight_decay" in hp and "lr" in hp:
                shrink = 1 - hp["lr"] * hp["weight_decay"]
                text += f" (AdamW's decay multiplies the weights by {shrink:g} per step)"
            text += "."
            if lecture_gaps:
                text += (
                    f" The lecture's table has them {_points(lecture_gaps[0])} (small) and "
                    f"{_points(lecture_gaps[1])} (lazy) points apart, which at these settings "
                    "would have to come from other differences between its runs (seeds, or a "
                    "larger weight decay)."
                )
            out.append(text)

    # Smoothness against the lecture's caption.
    sm = cmp["smoothness"]
    smoother = sm["smoother_at_lazy"]
    ratios_s = [s["lazy_over_small"] for s in sm["per_optimizer"].values()]
    ratios_s = [x for x in ratios_s if _is_num(x)]
    if ratios_s:
        verdict = (
            "holds for every optimizer"
            if sm["caption_holds_for_all"]
            else (
                f"holds for {len(smoother)} of {len(optimizers)} optimizers"
                + (f" ({_names(smoother)})" if smoother else "")
            )
        )
        out.append(
            f"*Smoothness.* The lecture's caption says the lazy regime gives smoother "
            f"boundaries. Measured as the mean ‖∇ₓp‖ over the mesh, the wide/small ratio is "
            f"{min(ratios_s):.2f}–{max(ratios_s):.2f}, so the caption {verdict}. This measure "
            "grows with wiggles but also with how sharply p switches from 0 to 1, so a straight "
            "but confident boundary counts as rough; the figure shows the shapes."
        )

    # Agreement with the lecture's table.
    inr = cmp["in_range"]
    by_metric = {m: [0, 0] for m in TABLE_METRICS}
    for regimes in inr.values():
        for metrics in regimes.values():
            for m, e in metrics.items():
                by_metric[m][0] += bool(e["inside"])
                by_metric[m][1] += 1
    parts = ", ".join(f"{_METRIC_LABELS[m]} {a} of {b}" for m, (a, b) in by_metric.items() if b)
    out.append(
        f"*Against the lecture's table.* {cmp['in_range_count']} of {cmp['in_range_total']} of "
        f"the lecture's numbers lie inside our seed range ({parts}). The lecture states neither "
        "its data, learning rates nor training budget, so a miss means the setups differ, not "
        "that either is wrong; our protocol was fixed before running and not tuned to match."
    )
    if not cmp["widths"]["match"]:
        out.append(
            f"*Widths.* This run used widths {small} and {wide}, not the lecture's "
            f"{cmp['widths']['lecture']['small']} and {cmp['widths']['lecture']['lazy']} "
            "(a reduced configuration); its 'lazy' column is compared with a narrower network."
        )
    return out
