"""Report of a ``quadratic`` run: iterations to tolerance against κ, slopes, Adam's grid, curves.

Reads only the run's files -- ``config.json``, ``env.json``, ``summary.json`` and
``metrics.jsonl`` -- and writes ``iterations_vs_kappa.png``, ``convergence.png`` and
``report.md``. Every number in the discussion is computed from those files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.experiments.quadratic import LABELS, REACHED
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

ITERATIONS_FIGURE = "iterations_vs_kappa.png"
CURVES_FIGURE = "convergence.png"

# One colour and marker per method, the same in both figures.
_STYLE: dict[str, tuple[str, str]] = {
    "sgd": ("tab:blue", "o"),
    "momentum": ("tab:orange", "s"),
    "nesterov": ("tab:green", "^"),
    "adam": ("tab:red", "D"),
    "newton": ("tab:purple", "v"),
}


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _kappa(k: float) -> str:
    """κ for a table: ``10``, ``32``, ``1e+04`` -> ``10``, ``32``, ``10000``."""
    return f"{k:.0f}" if k >= 1 else f"{k:.3g}"


def _lr(x: float) -> str:
    return f"{x:.3g}"


def _cell(counts: Sequence[int], status: Sequence[str], budget: int) -> str:
    """``median [min–max]`` of one κ's iteration counts; missed runs are flagged."""
    arr = np.asarray(counts, dtype=float)
    med, lo, hi = np.median(arr), arr.min(), arr.max()
    missed = sum(st != REACHED for st in status)

    def num(x: float) -> str:
        return f"> {budget}" if x > budget else f"{x:.0f}"

    text = num(med) if lo == hi else f"{num(med)} [{num(lo)}–{num(hi)}]"
    if missed:
        text += f" ({missed}/{len(status)} not reached)"
    return text


def _iterations_table(res: Mapping[str, Any]) -> str:
    methods = res["methods"]
    names = list(methods)
    budget = res["budget"]
    rows = []
    for i, k in enumerate(res["kappas"]):
        rows.append(
            [_kappa(k)]
            + [_cell(methods[m]["iterations"][i], methods[m]["status"][i], budget) for m in names]
        )
    rows.append(["fitted slope"] + [f"{methods[m]['slope']:.3f}" for m in names])
    rows.append(
        ["theory"]
        + [
            "-" if methods[m]["theory_slope"] is None else f"{methods[m]['theory_slope']:g}"
            for m in names
        ]
    )
    return md.table(["κ"] + [_label(m) for m in names], rows)


def _constants_table(res: Mapping[str, Any]) -> str:
    """The step sizes and momenta the tuned first-order methods used, per κ."""
    methods = res["methods"]
    tuned = [m for m in ("sgd", "momentum", "nesterov") if m in methods]
    if not tuned:
        return ""
    headers = ["κ"]
    for m in tuned:
        headers += [f"{_label(m)} lr"] + (["β"] if m != "sgd" else [])
    rows = []
    for i, k in enumerate(res["kappas"]):
        row: list[Any] = [_kappa(k)]
        for m in tuned:
            hyper = methods[m]["hyper"][i]
            row.append(f"{hyper['lr']:.4g}")
            if m != "sgd":
                row.append(f"{hyper['momentum']:.4f}")
        rows.append(row)
    return md.table(headers, rows)


def _adam_table(res: Mapping[str, Any]) -> str:
    """κ x learning rate: each track's median iterations, or when the race stopped it."""
    adam = res["methods"]["adam"]
    grid = sorted(adam["lr_grid"])
    budget = res["budget"]
    rows = []
    for i, k in enumerate(res["kappas"]):
        by_lr = {e["lr"]: e for e in adam["grid"][i]}
        row: list[Any] = [_kappa(k)]
        for lr in grid:
            e = by_lr[lr]
            if e["stopped_at"] is not None:
                row.append(f"> {e['stopped_at']} (stopped)")
                continue
            med = e["median"]
            text = f"> {budget}" if med is None or med > budget else f"{med:.0f}"
            row.append(f"**{text}**" if lr == adam["chosen_lr"][i] else text)
        rows.append(row)
    return md.table(["κ"] + [f"lr {_lr(lr)}" for lr in grid], rows)


def _iterations_figure(res: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    kappas = np.asarray(res["kappas"], dtype=float)
    budget = res["budget"]
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    unreached_drawn = False
    for m, r in res["methods"].items():
        color, marker = _STYLE.get(m, ("black", "o"))
        med = np.asarray(r["median"], dtype=float)
        lo, hi = np.asarray(r["min"], dtype=float), np.asarray(r["max"], dtype=float)
        label = f"{_label(m)}: slope {r['slope']:.2f}"
        if r["theory_slope"] is not None:
            label += f" (theory {r['theory_slope']:g})"
        ax.errorbar(
            kappas,
            med,
            yerr=[med - lo, hi - med],
            color=color,
            marker=marker,
            ms=5,
            capsize=3,
            lw=1.5,
            label=label,
        )
        # The fitted line, so the legend's slope can be checked by eye.
        fit = 10 ** (r["intercept"] + r["slope"] * np.log10(kappas))
        ax.plot(kappas, fit, color=color, lw=0.8, ls=":")
        missed = [i for i, st in enumerate(r["status"]) if any(s != REACHED for s in st)]
        if missed:
            ax.scatter(
                kappas[missed],
                hi[missed],
                marker="x",
                s=70,
                color="black",
                zorder=5,
                label=None if unreached_drawn else "some seed did not reach tol",
            )
            unreached_drawn = True
    ax.axhline(budget, color="grey", lw=0.8, ls="--")
    ax.annotate(
        f"budget {budget}", (kappas[-1], budget), va="bottom", ha="right", fontsize=8, color="grey"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("condition number κ")
    ax.set_ylabel(f"iterations to relative error {res['tol']:g} (median, min–max)")
    ax.set_title(f"½ θᵀAθ, d = {res['dim']}, {res['seeds']} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    return save_figure(fig, path)


def _curves(rows: list[dict[str, Any]], res: Mapping[str, Any]) -> dict[tuple[str, float], Any]:
    """(method, κ) -> (steps, errors[seed][point]) of the track the summary reports."""
    chosen = {}
    if "adam" in res["methods"]:
        adam = res["methods"]["adam"]
        chosen = dict(zip(res["kappas"], adam["chosen_lr"], strict=True))
    out: dict[tuple[str, float], Any] = {}
    for r in rows:
        if r.get("event") != "curve":
            continue
        if r["method"] == "adam" and r.get("lr") != chosen.get(r["kappa"]):
            continue
        out[(r["method"], r["kappa"])] = (r["steps"], r["errors"])
    return out


def _curves_figure(
    curves: dict[tuple[str, float], Any], res: Mapping[str, Any], path: Path
) -> Path | None:
    """Relative error against iteration at the smallest, a middle and the largest κ.

    One thin line per seed, cut at the iteration where that seed reached the tolerance (its
    track may have run on for slower seeds). Errors below 1e-16 (Newton's round-off, or an
    exact zero) are drawn at 1e-16 so that a log axis can show them.
    """
    kappas = res["kappas"]
    shown = sorted({kappas[0], kappas[len(kappas) // 2], kappas[-1]})
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, shown, strict=True):
        i = kappas.index(k)
        for m, r in res["methods"].items():
            if (m, k) not in curves:
                continue
            steps, errors = curves[(m, k)]
            steps = np.asarray(steps, dtype=float)
            color, marker = _STYLE.get(m, ("black", "o"))
            for s, err in enumerate(errors):
                err = np.maximum(np.asarray(err, dtype=float), 1e-16)
                # A log axis has no iteration 0 (where the error is 1).
                keep = (steps > 0) & (steps <= r["iterations"][i][s])
                ax.plot(
                    steps[keep],
                    err[keep],
                    color=color,
                    lw=1.0,
                    alpha=0.8,
                    marker=marker if keep.sum() <= 3 else None,
                    label=_label(m) if s == 0 else None,
                )
        ax.axhline(res["tol"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"κ = {_kappa(k)}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("‖θ_t − θ⋆‖ / ‖θ₀ − θ⋆‖ (one line per seed)")
    # Below the panels: inside, it would hide Newton's one point near the bottom.
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5)
    return save_figure(fig, path)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}×"


def discussion(res: Mapping[str, Any]) -> list[str]:
    """Sentences about the measured numbers, each computed from the summary."""
    methods = res["methods"]
    kappas = res["kappas"]
    k0, k1 = kappas[0], kappas[-1]
    span = math.log10(k1 / k0)
    out = [
        (
            "Theory for a quadratic with condition number κ: gradient descent needs "
            "O(κ log 1/ε) iterations, heavy ball and Nesterov with their optimal constants "
            f"O(√κ log 1/ε), Newton one step. Over κ = {_kappa(k0)} … {_kappa(k1)} "
            f"({span:.1f} decades) a slope of 1 means iterations grow {k1 / k0:.3g}×, a slope of "
            f"0.5 {math.sqrt(k1 / k0):.3g}×."
        )
    ]
    for m, theory in (("sgd", 1.0), ("momentum", 0.5), ("nesterov", 0.5)):
        if m not in methods:
            continue
        r = methods[m]
        med = r["median"]
        growth = med[-1] / med[0]
        rel = (
            "matches"
            if abs(r["slope"] - theory) <= 0.05
            else ("is above" if r["slope"] > theory else "is below")
        )
        out.append(
            f"{_label(m)}: slope {r['slope']:.3f}, which {rel} the theoretical {theory:g}; its "
            f"median count goes from {med[0]:.0f} to {med[-1]:.0f} iterations ({growth:.3g}×)."
        )
    if "momentum" in methods and methods["momentum"]["slope"] > 0.5:
        out.append(
            "Heavy ball's slope sits a little above 0.5: with the optimal constants the two roots "
            "of the extreme eigen-directions coincide, so their error decays like t·ρᵗ rather "
            "than ρᵗ, which adds a log factor that grows with κ."
        )
    if "sgd" in methods and "momentum" in methods:
        gd, hb = methods["sgd"]["median"][-1], methods["momentum"]["median"][-1]
        out.append(
            f"At κ = {_kappa(k1)} heavy ball needs {_ratio(gd, hb)} fewer iterations than GD "
            f"({hb:.0f} against {gd:.0f}); √κ = {math.sqrt(k1):.0f}."
        )
    if "momentum" in methods and "nesterov" in methods:
        hb, ne = methods["momentum"]["median"][-1], methods["nesterov"]["median"][-1]
        text = (
            f"Nesterov with η = 1/L needs {_ratio(ne, hb)} the iterations of heavy ball at "
            f"κ = {_kappa(k1)}."
        )
        if ne > hb:
            text += (
                " Both scale as √κ, but on a quadratic heavy ball's optimal rate "
                "(√κ−1)/(√κ+1) ≈ 1 − 2/√κ is about twice as far below 1 as Nesterov's "
                "≈ 1 − 1/√κ."
            )
        out.append(text)
    if "newton" in methods:
        worst = max(c for row in methods["newton"]["iterations"] for c in row)
        out.append(
            f"Newton: at most {worst} iteration(s) at every κ and seed, as the exact Hessian "
            f"of a quadratic makes one step land on θ⋆ up to round-off."
        )
    if "adam" in methods:
        a = methods["adam"]
        med = a["median"]
        missed = a["unreached"]
        edge = [_kappa(k) for k, e in zip(kappas, a["chosen_at_grid_edge"], strict=True) if e]
        text = (
            f"Adam (best learning rate per κ): slope {a['slope']:.3f}; median {med[0]:.0f} "
            f"iterations at κ = {_kappa(k0)} and {med[-1]:.0f} at κ = {_kappa(k1)}; the chosen "
            f"learning rate goes from {_lr(a['chosen_lr'][0])} to {_lr(a['chosen_lr'][-1])}."
        )
        if len(med) >= 3:
            flat = [k for k, m in zip(kappas, med, strict=True) if m <= 1.25 * med[0]]
            if len(flat) >= 2:
                text += (
                    f" Its count stays within 25% of the first value up to κ = "
                    f"{_kappa(max(flat))} and only then rises: the growth is not a power law, so "
                    f"the single slope summarises it poorly."
                )
        if "momentum" in methods:
            hb = methods["momentum"]["median"]
            wins = [_kappa(k) for k, x, y in zip(kappas, med, hb, strict=True) if x < y]
            text += (
                f" It beats heavy ball at κ = {', '.join(wins)}."
                if wins
                else " It never beats heavy ball."
            )
        if missed:
            text += (
                f" {missed} run(s) at the chosen learning rate did not reach the tolerance within "
                f"the budget (counted as budget + 1, so that slope is a lower bound there)."
            )
        if edge:
            text += (
                f" The chosen learning rate is at the edge of the grid at κ = {', '.join(edge)}."
            )
        text += (
            " Adam's counts exclude the cost of the learning-rate search, which the other "
            "methods do not need."
        )
        out.append(text)
    return out


def render(run_dir: Path) -> Path:
    """Write the figures and ``report.md`` for the ``quadratic`` run in ``run_dir``."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    res = summary["results"]
    claims = summary["claims"]
    methods = res["methods"]

    _iterations_figure(res, run_dir / ITERATIONS_FIGURE)
    curves_path = _curves_figure(_curves(read_metrics(run_dir), res), res, run_dir / CURVES_FIGURE)

    labels = ", ".join(f"`{m}` = {_label(m)}" for m in methods)
    parts = [
        f"# quadratic: iterations to relative error {res['tol']:g} against the condition number",
        "",
        "## Protocol",
        "",
        (
            f"`f(θ) = ½ θᵀAθ` in d = {res['dim']}, `A = Q diag(λ) Qᵀ` with λ log-spaced in "
            f"[1/κ, 1] (so L = 1, μ = 1/κ) and Q Haar-random; each of {res['seeds']} seeds draws "
            f"its own Q and θ₀ ~ N(0, I), shared across κ. θ⋆ = 0. A run counts the iterations "
            f"until ‖θ_t − θ⋆‖/‖θ₀ − θ⋆‖ ≤ {res['tol']:g}, within a budget of {res['budget']} "
            f"iterations (a run that misses counts as {res['budget'] + 1}). Methods: {labels}. "
            "GD uses η = 1/L; heavy ball η = 4/(√L+√μ)², β = ((√κ−1)/(√κ+1))²; Nesterov η = 1/L, "
            "β = (√κ−1)/(√κ+1); all three are `torch.optim.SGD` fed the analytic gradient Aθ. "
            f"Adam is `torch.optim.Adam` with {_adam_defaults(res)} at the learning rate of the "
            "grid with the smallest median iterations per κ. Newton solves with the exact "
            "Hessian. Slopes are least-squares fits of log10(median iterations) on log10 κ. The "
            f"optimizers run on {res.get('torch_threads', '?')} torch thread(s)."
        ),
        "",
        md.environment_line(env),
        "",
        "## Claims",
        "",
        md.claims_line(claims),
        "",
        md.claims_table(claims),
        "",
        "## Iterations to tolerance",
        "",
        "Median [min–max] over seeds; the last rows give the fitted log-log slope and theory's.",
        "",
        _iterations_table(res),
        "",
        (f"![Iterations to relative error {res['tol']:g} vs κ, log-log](./{ITERATIONS_FIGURE})"),
        "",
    ]
    constants = _constants_table(res)
    if constants:
        parts += ["### Tuned constants", "", constants, ""]
    if "adam" in methods:
        grid = ", ".join(_lr(x) for x in sorted(methods["adam"]["lr_grid"]))
        parts += [
            "## Adam's learning rate",
            "",
            (
                f"Grid: {grid}. Each cell is the median over seeds at that learning rate; the "
                "chosen one is bold. The grid runs as a race per κ: a learning rate whose median "
                'can no longer reach the best one found is stopped ("> t (stopped)"), which picks '
                "the same winner as running every learning rate to the end."
            ),
            "",
            _adam_table(res),
            "",
        ]
    if curves_path is not None:
        parts += [
            "## Convergence",
            "",
            f"![Relative error vs iteration at three values of κ](./{CURVES_FIGURE})",
            "",
        ]
    parts += ["## Discussion", ""]
    parts += [f"- {s}" for s in discussion(res)]
    parts += [
        "",
        "## Configuration",
        "",
        md.config_block(config),
        "",
        f"Wall-clock of the run: {res.get('wall_seconds', float('nan')):.1f} s.",
        "",
    ]
    path = run_dir / REPORT
    write_atomic(path, "\n".join(parts))
    return path


def _adam_defaults(res: Mapping[str, Any]) -> str:
    d = res.get("adam_defaults") or {}
    if not d:
        return "the registry's defaults"
    return ", ".join(f"{k} = {v}" for k, v in d.items())


__all__ = ["CURVES_FIGURE", "ITERATIONS_FIGURE", "discussion", "render"]
