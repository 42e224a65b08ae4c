"""Report of a ``moons`` run: the lecture's table beside ours, claims, boundaries, loss curves.

Reads only the run's files -- ``config.json``, ``env.json``, ``summary.json``, ``metrics.jsonl``
and ``boundaries.npz`` -- and writes ``boundaries.png``, ``loss_curves.png``, ``movement.png`` and
``report.md``. Every sentence of the discussion is computed from those numbers.

This module draws the figures and tables and writes the page; ``moons_text`` holds the number
formatting and the discussion.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.experiments.moons import (
    BOUNDARIES,
    TABLE_METRICS,
    boundary_key,
)
from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    REPORT,
    SUMMARY,
    read_json,
    read_metrics,
    write_atomic,
)
from guided_descent.report import markdown as md
from guided_descent.report.figures import pyplot, save_figure
from guided_descent.report.moons_text import (
    _METRIC_LABELS,
    _is_num,
    _label,
    _names,
    _ours,
    _points,
    _value,
    discussion,
)

BOUNDARY_FIGURE = "boundaries.png"
LOSS_FIGURE = "loss_curves.png"
MOVEMENT_FIGURE = "movement.png"

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
