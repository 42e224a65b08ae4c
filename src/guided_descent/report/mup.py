"""Report of a ``mup`` run: coordinate checks and learning-rate transfer, SP against μP.

Reads only the run's files -- ``config.json``, ``env.json`` and ``summary.json`` -- and writes
``coord_check.png``, ``lr_transfer.png`` and ``report.md``. Every sentence of the discussion is
computed from those numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.experiments.mup import LABELS, PARAMETRIZATIONS
from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    REPORT,
    SUMMARY,
    read_json,
    write_atomic,
)
from guided_descent.report import markdown as md
from guided_descent.report.figures import pyplot, save_figure

COORD_FIGURE = "coord_check.png"
TRANSFER_FIGURE = "lr_transfer.png"


def _title(label: str) -> str:
    model, optimizer = label.split("/")
    return f"{model.upper()} + {optimizer}"


def _lr(k: int | None) -> str:
    return "-" if k is None else f"2^{k}"


def coord_figure(res: Mapping[str, Any], path: Path) -> Path:
    """One row per (model, optimizer), SP left and μP right: each layer's scale against width.

    The scale is the mean |activation| over the late coordinate-check steps and the seeds; the
    two panels of a row share their y axis, so a flat μP line next to a rising SP line is the
    whole story.
    """
    plt = pyplot()
    coord = res["coord"]
    widths = np.asarray(res["widths"], dtype=float)
    labels = list(coord)
    fig, axes = plt.subplots(
        len(labels), 2, figsize=(10.0, 3.3 * len(labels)), sharey="row", squeeze=False
    )
    for row, label in enumerate(labels):
        layers = list(coord[label]["sp"]["late_scale"])
        colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(layers)))
        for col, param in enumerate(PARAMETRIZATIONS):
            ax = axes[row][col]
            entry = coord[label][param]
            for color, layer in zip(colors, layers, strict=True):
                ax.plot(
                    widths,
                    entry["late_scale"][layer],
                    marker="o",
                    ms=3,
                    lw=1.3,
                    color=color,
                    label=layer,
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            stat = (
                f"max/min over widths ≤ {entry['worst_spread']:.2f}"
                if param == "mup"
                else f"widest/narrowest up to {entry['max_growth']:.3g}x"
            )
            ax.set_title(f"{_title(label)}, {LABELS[param]}: {stat}", fontsize=9)
            ax.set_xlabel("width")
        axes[row][0].set_ylabel("mean |activation|")
        axes[row][1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(
        f"Coordinate check: layer outputs after steps {res['coord_steps'] // 2}–"
        f"{res['coord_steps'] - 1} (mean over {res['seeds']} seed(s))",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def transfer_figure(res: Mapping[str, Any], path: Path) -> Path | None:
    """Training loss after the budget against the learning rate, one curve per width."""
    transfer = res["transfer"]
    if not transfer:
        return None
    plt = pyplot()
    widths = res["widths"]
    exps = np.asarray(res["lr_exponents"], dtype=float)
    names = list(transfer)
    fig, axes = plt.subplots(
        len(names), 2, figsize=(10.0, 3.6 * len(names)), sharey="row", squeeze=False
    )
    colors = plt.cm.plasma(np.linspace(0.0, 0.85, len(widths)))
    for row, name in enumerate(names):
        for col, param in enumerate(PARAMETRIZATIONS):
            ax = axes[row][col]
            entry = transfer[name][param]
            for color, w in zip(colors, widths, strict=True):
                loss = np.asarray(entry["median_loss"][str(w)], dtype=float)
                loss[~np.isfinite(loss)] = np.nan  # diverged: a gap in the curve
                ax.plot(exps, loss, marker="o", ms=3, lw=1.4, color=color, label=f"width {w}")
                best = entry["best_exponent"][str(w)]
                ax.plot(
                    best,
                    loss[list(exps).index(best)],
                    marker="*",
                    ms=13,
                    color=color,
                    markeredgecolor="black",
                    zorder=5,
                )
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("log2 learning rate")
            ax.set_title(
                f"MLP + {name}, {LABELS[param]}: best lr moves {abs(entry['shift'])} grid step(s)",
                fontsize=9,
            )
        axes[row][0].set_ylabel(f"train loss after {res.get('steps', '?')} steps (median)")
        axes[row][1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Learning-rate transfer across width (★ = best learning rate)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def _coord_table(coord: Mapping[str, Any]) -> str:
    rows = []
    for label, entry in coord.items():
        for layer in entry["sp"]["late_scale"]:
            rows.append(
                [
                    _title(label),
                    layer,
                    entry["sp"]["growth"][layer],
                    entry["sp"]["spread"][layer],
                    entry["mup"]["growth"][layer],
                    entry["mup"]["spread"][layer],
                ]
            )
    headers = ["model", "layer", "SP widest/narrowest", "SP max/min", "μP widest/narrowest"]
    return md.table([*headers, "μP max/min"], rows)


def _transfer_table(transfer: Mapping[str, Any], widths: Sequence[int], grid: Sequence[int]) -> str:
    """Per optimizer and width: the best learning rate and its loss, SP and μP."""
    rows = []
    for name, entry in transfer.items():
        for w in widths:
            row: list[Any] = [name, w]
            for param in PARAMETRIZATIONS:
                e = entry[param]
                k = e["best_exponent"][str(w)]
                edge = " (grid edge)" if e["best_at_grid_edge"][str(w)] else ""
                loss = e["median_loss"][str(w)][list(grid).index(k)]
                row += [_lr(k) + edge, loss]
            rows.append(row)
    return md.table(
        ["optimizer", "width", "SP best lr", "SP loss there", "μP best lr", "μP loss there"],
        rows,
        digits=3,
    )


def discussion(res: Mapping[str, Any]) -> list[str]:
    """Sentences about the measured numbers, each computed from the summary."""
    widths = res["widths"]
    grid = list(res["lr_exponents"])
    narrow, wide = str(widths[0]), str(widths[-1])
    out = []
    for label, entry in res["coord"].items():
        sp, mu = entry["sp"], entry["mup"]
        text = (
            f"{_title(label)}: under SP the layer that grows most is `{sp['max_growth_layer']}` "
            f"({sp['max_growth']:.3g}x from width {narrow} to {wide}); under μP every layer stays "
            f"within {mu['worst_spread']:.2f}x across widths (worst: `{mu['worst_spread_layer']}`)."
        )
        flat_sp = [layer for layer, g in sp["spread"].items() if g < 2.0]
        if flat_sp and label.endswith(("muon", "shampoo", "soap")):
            text += (
                f" Already flat under SP: {', '.join(f'`{x}`' for x in flat_sp)} -- the matrix "
                "optimizer's own update has a width-independent spectral size, so what grows "
                "under SP is what AdamW trains (the readout)."
            )
        out.append(text)
    for name, entry in res["transfer"].items():
        sp, mu = entry["sp"], entry["mup"]
        sp_best, mu_best = sp["best_exponent"], mu["best_exponent"]
        out.append(
            f"MLP + {name}: under SP the best learning rate goes from {_lr(sp_best[narrow])} "
            f"at width {narrow} to {_lr(sp_best[wide])} at width {wide} "
            f"({2.0 ** abs(sp['shift']):g}x); under μP from {_lr(mu_best[narrow])} to "
            f"{_lr(mu_best[wide])} ({2.0 ** abs(mu['shift']):g}x)."
        )
        best_mu = [min(mu["median_loss"][str(w)]) for w in widths]
        best_sp = [min(sp["median_loss"][str(w)]) for w in widths]
        # "Worse" beyond 5%: a finite budget and a few seeds make smaller differences noise.
        worse = [
            f"{widths[i]} → {widths[i + 1]}"
            for i in range(len(widths) - 1)
            if best_mu[i + 1] > 1.05 * best_mu[i]
        ]
        text = (
            f"Best μP loss per width: {', '.join(f'{b:.3g}' for b in best_mu)}; "
            + (
                "it never gets worse by more than 5% as width grows (wider is better, as μP "
                "promises)."
                if not worse
                else f"it gets worse from width {', '.join(worse)}."
            )
            + f" At width {wide} the best SP loss over the grid is {best_sp[-1]:.3g} and the best "
            f"μP loss {best_mu[-1]:.3g}"
            + (
                ": SP, tuned at that width, does better here; what μP buys is not having to "
                "search the learning rate at the wide width."
                if best_sp[-1] < best_mu[-1]
                else ": μP matches or beats SP even with SP tuned at that width."
            )
        )
        # What the SP practitioner loses by reusing the narrow model's learning rate.
        sp_at_base = sp["median_loss"][wide][grid.index(sp["best_exponent"][narrow])]
        sp_best = min(sp["median_loss"][wide])
        mu_at_base = mu["median_loss"][wide][grid.index(mu["best_exponent"][narrow])]
        text += (
            f" Reusing width {narrow}'s best learning rate at width {wide}: SP reaches "
            f"{sp_at_base:.3g} (its own best there: {sp_best:.3g}); μP reaches {mu_at_base:.3g}."
        )
        out.append(text)
        edges = [
            f"{LABELS[p]} at width {w}"
            for p in PARAMETRIZATIONS
            for w, e in entry[p]["best_at_grid_edge"].items()
            if e
        ]
        if edges:
            out.append(
                f"MLP + {name}: the best learning rate sits at the edge of the grid for "
                f"{', '.join(edges)}; the true optimum may lie beyond it."
            )
    return out


def render(run_dir: Path) -> Path:
    """Write the figures and ``report.md`` for the ``mup`` run in ``run_dir``."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    res = {**summary["results"], "steps": config.get("steps")}
    claims = summary["claims"]

    coord_figure(res, run_dir / COORD_FIGURE)
    transfer_path = transfer_figure(res, run_dir / TRANSFER_FIGURE)
    widths = res["widths"]
    late = f"{res['coord_steps'] // 2}–{res['coord_steps'] - 1}"
    parts = [
        "# mup: hyper-parameter transfer across width, SP against μP",
        "",
        "## Protocol",
        "",
        (
            f"Widths {', '.join(map(str, widths))}; μP relative to base width "
            f"{res['base_width']} (`guided_descent.mup`: TP5 Table 3 in its init + learning-rate "
            "form, spectral rules for matrix optimizers). SP: torch's default initialisation and "
            "one learning rate for every parameter. MLP `64 → w → w → 10` (ReLU) on scikit-learn's "
            "digits (standardised, 80/20 split); GPT: two blocks, head size 16, untied head, "
            "GPT-2 init, on a random Markov chain over 32 tokens. "
            f"**Coordinate check**: {res['coord_steps']} training steps (Adam lr "
            f"{config.get('coord_lr')} for the MLP, {config.get('gpt_lr')} for the GPT; matrix "
            f"groups at {res['matrix_lr_ratio']:g}x); a layer's scale is its mean |output| over "
            f"steps {late}, averaged over {res['seeds']} seed(s). **Transfer**: "
            f"{config.get('steps')} steps at batch {config.get('batch_size')}, learning rates "
            f"2^{res['lr_exponents'][0]} … 2^{res['lr_exponents'][-1]} (one grid step = 2x); the "
            f"training loss on the whole training split after the budget, median over "
            f"{res['seeds']} seed(s). Within a seed, all configurations share initial draws and "
            f"batches. Runs on {res.get('torch_threads', '?')} torch thread(s)."
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
        "## Coordinate check",
        "",
        f"![Layer scale vs width, SP and μP](./{COORD_FIGURE})",
        "",
        _coord_table(res["coord"]),
        "",
    ]
    if transfer_path is not None:
        parts += [
            "## Learning-rate transfer",
            "",
            f"![Training loss vs learning rate per width, SP and μP](./{TRANSFER_FIGURE})",
            "",
            _transfer_table(res["transfer"], widths, res["lr_exponents"]),
            "",
        ]
    parts += ["## Discussion", ""]
    parts += [f"- {s}" for s in discussion(res)]
    timings = res.get("timings", {})
    parts += [
        "",
        "## Configuration",
        "",
        md.config_block(config),
        "",
        (
            f"Wall-clock of the run: {res.get('wall_seconds', float('nan')):.1f} s "
            f"(coordinate checks {timings.get('coordinate_check', float('nan')):.1f} s, "
            f"learning-rate sweeps {timings.get('transfer', float('nan')):.1f} s)."
        ),
        "",
    ]
    path = run_dir / REPORT
    write_atomic(path, "\n".join(parts))
    return path


__all__ = [
    "COORD_FIGURE",
    "TRANSFER_FIGURE",
    "coord_figure",
    "discussion",
    "render",
    "transfer_figure",
]
