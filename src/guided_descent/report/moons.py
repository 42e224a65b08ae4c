"""Report of a ``moons`` run: the lecture's table beside ours, claims, boundaries, loss curves.

Reads only the run's files -- ``config.json``, ``env.json``, ``summary.json``, ``metrics.jsonl``
and ``boundaries.npz`` -- and writes ``boundaries.png``, ``loss_curves.png``, ``movement.png`` and
``report.md``. Every sentence of the discussion is computed from those numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.experiments.moons import (
    BOUNDARIES,
    LECTURE_NAMES,
    TABLE_METRICS,
    boundary_key,
)
from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    FAIL,
    REPORT,
    SUMMARY,
    UNDECIDED,
    claim_verdict,
    read_json,
    read_metrics,
    write_atomic,
)
from guided_descent.report import markdown as md
from guided_descent.report.figures import pyplot, save_figure

BOUNDARY_FIGURE = "boundaries.png"
LOSS_FIGURE = "loss_curves.png"
MOVEMENT_FIGURE = "movement.png"

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


# --------------------------------------------------------------------------------------------
# Figures


def _seed0_test_acc(metrics: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    return {
        (r["optimizer"], r["width"]): r["test_acc"]
        for r in metrics
        if r.get("event") == "final" and r.get("seed") == 0
    }


def boundary_figure(
    run_dir: Path, optimizers: Sequence[str], widths: Sequence[int], metrics: list[dict[str, Any]]
) -> Path | None:
    """Rows = widths, columns = optimizers: seed 0's ``p(class 1)`` with train and test points."""
    path = run_dir / BOUNDARIES
    if not path.is_file():
        return None
    plt = pyplot()
    acc = _seed0_test_acc(metrics)
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    xs, ys = data["xs"], data["ys"]
    rows, cols = len(widths), len(optimizers)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols, 2.3 * rows), squeeze=False, sharex=True, sharey=True
    )
    levels = np.linspace(0.0, 1.0, 11)
    filled = None
    for i, width in enumerate(widths):
        for j, name in enumerate(optimizers):
            ax = axes[i][j]
            key = boundary_key(name, width)
            if key in data:
                filled = ax.contourf(xs, ys, data[key], levels=levels, cmap="RdBu_r", alpha=0.75)
                ax.contour(xs, ys, data[key], levels=[0.5], colors="k", linewidths=0.8)
            # Train points as dots, test points as triangles; colour = true class.
            for split, marker, size in (("train", "o", 4), ("test", "^", 9)):
                points, labels = data[f"x_{split}"], data[f"y_{split}"]
                ax.scatter(
                    points[:, 0],
                    points[:, 1],
                    c=labels,
                    cmap="RdBu_r",
                    vmin=0,
                    vmax=1,
                    s=size,
                    marker=marker,
                    edgecolors="k",
                    linewidths=0.2,
                )
            title = f"{_label(name)}, w={width}"
            if (name, width) in acc:
                title += f"\ntest {100 * acc[(name, width)]:.1f}%"
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if filled is not None:
        fig.colorbar(filled, ax=axes, shrink=0.7, label="p(class 1), seed 0")
    return save_figure(fig, run_dir / BOUNDARY_FIGURE)


def _curves(
    metrics: list[dict[str, Any]], key: str
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(optimizer, width) -> (steps, median, min, max) of ``key`` over seeds at each logged step."""
    by_step: dict[tuple[str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in metrics:
        if r.get("event") != "eval":
            continue
        v = r.get(key)
        by_step[(r["optimizer"], r["width"])][r["step"]].append(v if _is_num(v) else np.nan)
    out = {}
    for cell, steps in by_step.items():
        order = sorted(steps)
        vals = [np.asarray(steps[s], dtype=float) for s in order]
        out[cell] = (
            np.asarray(order),
            np.array([np.median(v) for v in vals]),
            np.array([v.min() for v in vals]),
            np.array([v.max() for v in vals]),
        )
    return out


def loss_figure(
    run_dir: Path, optimizers: Sequence[str], widths: Sequence[int], metrics: list[dict[str, Any]]
) -> Path | None:
    """Full-train-set loss against step, one panel per width: median line, min-max band."""
    curves = _curves(metrics, "train_loss")
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(widths), figsize=(4.6 * len(widths), 3.4), squeeze=False, sharey=True
    )
    for ax, width in zip(axes[0], widths, strict=True):
        for name in optimizers:
            if (name, width) not in curves:
                continue
            steps, med, lo, hi = curves[(name, width)]
            (line,) = ax.plot(steps, med, label=_label(name), lw=1.4)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"width {width}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("train loss (full train set)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Training loss: median over seeds, band = min-max", fontsize=10)
    return save_figure(fig, run_dir / LOSS_FIGURE)


def movement_figure(
    run_dir: Path, optimizers: Sequence[str], widths: Sequence[int], cells: Mapping[str, Any]
) -> Path:
    """First-layer relative movement per optimizer, one bar per width (log scale, min-max bars)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(optimizers) * len(widths) / 2 + 2.5, 3.2))
    n = len(widths)
    bar = 0.8 / n
    x = np.arange(len(optimizers))
    for k, width in enumerate(widths):
        stats = [cells[o][str(width)]["movement"] for o in optimizers]
        med = np.array([s["median"] if _is_num(s["median"]) else np.nan for s in stats])
        lo = np.array([s["min"] if _is_num(s["min"]) else np.nan for s in stats])
        hi = np.array([s["max"] if _is_num(s["max"]) else np.nan for s in stats])
        offset = (k - (n - 1) / 2) * bar
        ax.bar(x + offset, med, bar, yerr=[med - lo, hi - med], capsize=2, label=f"width {width}")
    ax.set_xticks(x, [_label(o) for o in optimizers], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("||W_T - W_0|| / ||W_0||  (layer 1)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    return save_figure(fig, run_dir / MOVEMENT_FIGURE)


# --------------------------------------------------------------------------------------------
# Tables


def lecture_table(
    regime: str,
    optimizers: Sequence[str],
    cells: Mapping[str, Any],
    width: int,
    in_range: Mapping[str, Any],
) -> str:
    """One regime: per optimizer and metric, the lecture's value beside ours (median [range]).

    A lecture value in bold lies inside our seed range.
    """
    headers = ["optimizer"]
    for m in TABLE_METRICS:
        headers += [f"{_METRIC_LABELS[m]} (lecture)", f"{_METRIC_LABELS[m]} (ours)"]
    rows = []
    for name in optimizers:
        row = [_label(name)]
        for m in TABLE_METRICS:
            entry = in_range.get(name, {}).get(regime, {}).get(m)
            if entry is None:
                lecture = "-"
            else:
                lecture = _value(m, entry["lecture"])
                lecture = f"**{lecture}**" if entry["inside"] else lecture
            row += [lecture, _ours(m, cells[name][str(width)][m])]
        rows.append(row)
    return md.table(headers, rows)


def ranking_table(best: Mapping[str, Any], widths: Mapping[str, int]) -> str:
    rows = []
    for regime, r in best.items():
        lecture_best = r.get("lecture_best")
        rows.append(
            (
                regime,
                widths[regime],
                _label(lecture_best) if lecture_best else "-",
                f"{_names(r['best'])} ({_value('test_acc', r['best_test_acc'])})",
                _points(r.get("gap")),
                _points(r.get("spread")),
                r.get("gap_exceeds_spread"),
                f"{r.get('paired_wins', '-')} of {r.get('paired_seeds', '-')}",
                _points(r.get("median_range")),
                _points(r.get("typical_seed_range")),
                r.get("best_agrees"),
            )
        )
    return md.table(
        (
            "regime",
            "our width",
            "lecture's best",
            "our best (median test acc)",
            "gap to runner-up (pts)",
            "seed spread (pts)",
            "gap > spread",
            "leader beats runner-up on",
            "best - worst median (pts)",
            "typical seed range (pts)",
            "lecture's best among ours",
        ),
        rows,
    )


def smoothness_table(
    smooth: Mapping[str, Any], cells: Mapping[str, Any], small: int, wide: int
) -> str:
    rows = []
    for name, s in smooth.items():
        rows.append(
            (
                _label(name),
                _ours("smoothness", cells[name][str(small)]["smoothness"]),
                _ours("smoothness", cells[name][str(wide)]["smoothness"]),
                s["lazy_over_small"],
                _is_num(s["lazy"]) and _is_num(s["small"]) and s["lazy"] < s["small"],
            )
        )
    return md.table(
        (
            "optimizer",
            f"mean ‖∇p‖, width {small}",
            f"mean ‖∇p‖, width {wide}",
            "wide / small",
            "smoother when wide",
        ),
        rows,
    )


def movement_table(
    optimizers: Sequence[str], cells: Mapping[str, Any], small: int, wide: int
) -> str:
    rows = []
    for name in optimizers:
        a = cells[name][str(small)]["movement"]
        b = cells[name][str(wide)]["movement"]
        ratio = a["median"] / b["median"] if _is_num(a["median"]) and b["median"] else None
        rows.append((_label(name), _ours("movement", a), _ours("movement", b), ratio))
    return md.table(
        ("optimizer", f"width {small}", f"width {wide}", "small / wide (median)"), rows
    )


# --------------------------------------------------------------------------------------------
# Discussion


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


# --------------------------------------------------------------------------------------------


def _protocol(config: Mapping[str, Any], hyperparams: Mapping[str, Any]) -> str:
    hp = "; ".join(
        f"{_label(n)}: " + ", ".join(f"{k} {v}" for k, v in p.items())
        for n, p in hyperparams.items()
    )
    widths = " and ".join(str(w) for w in config["widths"])
    return (
        f"Two moons (`sklearn.datasets.make_moons`, {config['n_samples']} points, noise "
        f"{config['noise']}), split 80/20 at random; a ReLU network 2 → w → 2 with w = {widths} "
        f"and PyTorch's default initialisation; cross-entropy; {config['steps']} steps at batch "
        f"size {config['batch_size']} (shuffled epochs back to back); {config['seeds']} seeds, "
        "each drawing its own data set, split, initial weights and batch order. Within a seed, "
        "every optimizer sees the same data and batches, and at one width starts from the same "
        f"weights. Hyper-parameters are the registry's defaults ({hp}). Numbers are the median "
        "[min–max] over seeds, measured after the last step on the whole train or test split. "
        "Relative movement is ‖W_T − W_0‖/‖W_0‖ of the first layer; smoothness is the mean "
        f"‖∇ₓ p(class 1)‖ over a {config['mesh_resolution']}×{config['mesh_resolution']} grid "
        "around the data."
    )


def render(run_dir: Path) -> Path:
    """Write the figures and ``report.md`` of the moons run in ``run_dir``; return the report."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV) if (run_dir / ENV).is_file() else {}
    summary = read_json(run_dir / SUMMARY)
    metrics = read_metrics(run_dir)
    res = summary["results"]
    optimizers: list[str] = res["optimizers"]
    widths: list[int] = res["widths"]
    small, wide = res["small_width"], res["wide_width"]
    cells = res["cells"]
    cmp = res["lecture"]

    figures = []
    path = boundary_figure(run_dir, optimizers, widths, metrics)
    if path is not None:
        figures.append(
            (
                path,
                "Decision boundaries, seed 0: p(class 1) with the 0.5 contour in black; dots are "
                "training points, triangles test points, coloured by their true class",
            )
        )
    path = loss_figure(run_dir, optimizers, widths, metrics)
    if path is not None:
        figures.append((path, "Training loss on the full train set"))
    figures.append(
        (
            movement_figure(run_dir, optimizers, widths, cells),
            "First-layer relative movement (median, min-max bars)",
        )
    )

    parts = [
        "# moons: optimizer choice against network width",
        "",
        _protocol(config, res.get("hyperparams", {})),
        "",
        md.environment_line(env),
        f"Training took {res['wall_seconds']:.0f} s in all.",
        "",
        "## Claims",
        "",
        md.claims_table(summary["claims"]),
        "",
        "## The lecture's table beside ours",
        "",
        "Lecture values in **bold** lie inside our seed range; ours are median [min–max] over "
        f"{res['seeds']} seeds, accuracies in %.",
    ]
    for regime, width in cmp["widths"]["ours"].items():
        lw = cmp["widths"]["lecture"][regime]
        parts += [
            "",
            f"**{regime.capitalize()} regime** — lecture width {lw}, ours {width}",
            "",
            lecture_table(regime, optimizers, cells, width, cmp["in_range"]),
        ]
    parts += [
        "",
        "## Comparisons with the lecture",
        "",
        "Best optimizer per regime by median test accuracy (ties listed together; 'pts' are "
        "percentage points):",
        "",
        ranking_table(cmp["best"], cmp["widths"]["ours"]),
        "",
        "Boundary smoothness (mean ‖∇ₓp‖ over the mesh; lower is smoother):",
        "",
        smoothness_table(cmp["smoothness"]["per_optimizer"], cells, small, wide),
        "",
        "First-layer relative movement ‖W_T − W_0‖/‖W_0‖:",
        "",
        movement_table(optimizers, cells, small, wide),
        "",
        "## Figures",
        "",
    ]
    for path, caption in figures:
        parts += [f"![{caption}](./{path.name})", ""]
    parts += ["## Discussion", ""]
    for paragraph in discussion(summary, config, metrics):
        parts += [paragraph, ""]
    parts += ["## Configuration", "", md.config_block(config), ""]

    report = run_dir / REPORT
    write_atomic(report, "\n".join(parts))
    return report
