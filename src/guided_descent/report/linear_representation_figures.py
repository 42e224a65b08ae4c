"""The figures of a ``linear-representation`` report: distance curves, steps-to-0.1 against
κ_x, transfer. Drawn from the run's ``summary.json`` and ``metrics.jsonl`` only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.report.figures import pyplot, save_figure
from guided_descent.report.linear_representation_cells import (
    _cell,
    _cells,
    _k,
    _kappas,
    _label,
    _median,
)

# One colour, line style and marker per method, the same in every figure: the paper's methods
# solid, the library's dashed.
_STYLE: dict[str, tuple[str, str, str]] = {
    "layerwise": ("tab:red", "-", "o"),
    "layerwise_one_sided": ("tab:orange", "-", "v"),
    "gauss_newton": ("tab:purple", "-", "D"),
    "sgd": ("tab:blue", "-", "s"),
    "adam": ("tab:green", "-", "^"),
    "kfac": ("tab:brown", "--", "P"),
    "shampoo": ("tab:pink", "--", "X"),
    "soap": ("tab:gray", "--", "*"),
    "muon": ("tab:olive", "--", "h"),
}


def _curves(
    rows: list[dict[str, Any]], res: Mapping[str, Any]
) -> dict[tuple[str, float, float], tuple[np.ndarray, np.ndarray]]:
    """(method, κ_x, κ_F) -> (steps, dist[step, seed]) of the grid value each cell chose;
    blown-up seeds are NaN."""
    chosen = {}
    for m in res["methods"]:
        for kx, kf in _cells(res):
            entry = _cell(res, m, kx, kf)
            if entry is not None:
                chosen[(m, kx, kf)] = entry["hyper"]
    points: dict[tuple[str, float, float], dict[int, list[float]]] = {}
    for r in rows:
        if r.get("event") != "step":
            continue
        key = (r["method"], r["kappa_x"], r["kappa_f"])
        if key not in chosen or r["hyper"] != chosen[key]:
            continue
        points.setdefault(key, {})[r["step"]] = [math.nan if d is None else d for d in r["dist"]]
    out = {}
    for key, by_step in points.items():
        steps = sorted(by_step)
        out[key] = (
            np.asarray(steps, dtype=float),
            np.asarray([by_step[s] for s in steps], dtype=float),
        )
    return out


def _legend_below(fig: Any, ax: Any) -> None:
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5, fontsize=8)


def _dist_figure(
    curves: Mapping[tuple[str, float, float], tuple[np.ndarray, np.ndarray]],
    res: Mapping[str, Any],
    path: Path,
) -> Path | None:
    """Subspace distance against step: rows κ_F, columns κ_x; median over seeds, range shaded."""
    if not curves:
        return None
    kxs, kfs = _kappas(res)
    plt = pyplot()
    fig, axes = plt.subplots(
        len(kfs),
        len(kxs),
        figsize=(3.6 * len(kxs), 3.0 * len(kfs)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, kf in enumerate(kfs):
        for j, kx in enumerate(kxs):
            ax = axes[i, j]
            for m in res["methods"]:
                if (m, kx, kf) not in curves:
                    continue
                steps, dist = curves[(m, kx, kf)]
                keep = steps >= 1  # a log axis has no step 0
                with np.errstate(all="ignore"):
                    med = np.nanmedian(dist, axis=1)
                    lo, hi = np.nanmin(dist, axis=1), np.nanmax(dist, axis=1)
                color, ls, _ = _STYLE.get(m, ("black", "-", "o"))
                ax.plot(steps[keep], med[keep], color=color, ls=ls, lw=1.4, label=_label(m))
                ax.fill_between(steps[keep], lo[keep], hi[keep], color=color, alpha=0.12, lw=0)
            ax.axhline(res["target"], color="black", lw=0.7, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(1e-3, 1.5)
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"κ_x = {_k(kx)}, κ_F = {_k(kf)}", fontsize=9)
            if i == len(kfs) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("dist(G, G⋆)")
    _legend_below(fig, axes[0, 0])
    fig.suptitle(
        f"Subspace distance, median over {res['seeds']} seeds (shaded: min–max); dotted: "
        f"{res['target']:g}",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _steps_figure(res: Mapping[str, Any], path: Path) -> Path:
    """Median steps-to-0.1 against κ_x, log–log, one panel per κ_F; medians that miss sit at
    ``budget + 1`` (hollow markers)."""
    kxs, kfs = _kappas(res)
    budget = res["steps"]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kfs), figsize=(5.2 * len(kfs), 4.2), sharey=True, squeeze=False)
    for ax, kf in zip(axes[0], kfs, strict=True):
        for m in res["methods"]:
            entries = [(kx, _cell(res, m, kx, kf)) for kx in kxs]
            present = [(kx, e) for kx, e in entries if e is not None]
            if not present:
                continue
            color, ls, marker = _STYLE.get(m, ("black", "-", "o"))
            x = np.asarray([kx for kx, _ in present], dtype=float)
            med = np.asarray([e["median_steps"] for _, e in present], dtype=float)
            steps = [[s for s in e["steps"] if s is not None] for _, e in present]
            lo = np.asarray([min(s) for s in steps], dtype=float)
            hi = np.asarray([max(s) for s in steps], dtype=float)
            missed = med > budget
            ax.plot(
                x,
                med,
                color=color,
                ls=ls,
                lw=1.3,
                marker=marker,
                ms=5,
                markevery=list(np.flatnonzero(~missed)),
                label=_label(m),
            )
            ax.errorbar(x, med, yerr=[med - lo, hi - med], color=color, ls="none", capsize=2)
            ax.scatter(
                x[missed],
                med[missed],
                facecolors="none",
                edgecolors=color,
                marker=marker,
                s=40,
                zorder=3,
            )
        ax.axhline(budget + 1, color="grey", lw=0.8, ls="--")
        ax.annotate(
            f"budget ({budget}): hollow = median missed",
            (kxs[0], budget + 1),
            va="bottom",
            fontsize=7,
            color="grey",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("κ_x (condition number of Σ_x)")
        ax.set_title(f"κ_F = {_k(kf)}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel(f"steps to dist ≤ {res['target']:g} (median, min–max)")
    _legend_below(fig, axes[0, 0])
    fig.tight_layout()
    return save_figure(fig, path)


def _transfer_figure(res: Mapping[str, Any], path: Path) -> Path | None:
    """Median excess transfer risk (G taken at ``compare_at``) against κ_x, per κ_F."""
    kxs, kfs = _kappas(res)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kfs), figsize=(5.2 * len(kfs), 4.0), sharey=True, squeeze=False)
    drawn = False
    for ax, kf in zip(axes[0], kfs, strict=True):
        for m in res["methods"]:
            pts = []
            for kx in kxs:
                e = _cell(res, m, kx, kf)
                med = None if e is None else _median(e["transfer_excess"])
                if med is not None and med > 0:  # a log axis cannot show 0 or below
                    pts.append((kx, med))
            if not pts:
                continue
            color, ls, marker = _STYLE.get(m, ("black", "-", "o"))
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=color, ls=ls, marker=marker, ms=4, label=_label(m))
            drawn = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("κ_x")
        ax.set_title(f"κ_F = {_k(kf)}")
        ax.grid(True, which="both", alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0, 0].set_ylabel(f"excess risk vs oracle G⋆ (G after {res['compare_at']} steps)")
    _legend_below(fig, axes[0, 0])
    fig.tight_layout()
    return save_figure(fig, path)
