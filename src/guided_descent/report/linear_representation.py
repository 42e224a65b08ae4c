"""Report of a ``linear-representation`` run: distance curves, steps-to-0.1 against κ_x, transfer.

Reads only the run's files -- ``config.json``, ``env.json``, ``summary.json`` and
``metrics.jsonl`` -- and writes ``dist_vs_step.png``, ``steps_vs_kappa.png``, ``transfer.png``
and ``report.md``. Every number in the text is computed from those files.

This module holds the tables and the page; the figures are drawn in
``linear_representation_figures``, the discussion written in ``linear_representation_discussion``,
and both read the summary through ``linear_representation_cells``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
from guided_descent.report.linear_representation_cells import (
    Entry,
    _cell,
    _cells,
    _fmt_steps,
    _hyper,
    _k,
    _kappas,
    _label,
    _median,
)
from guided_descent.report.linear_representation_discussion import (
    discussion_dist,
    discussion_paper,
    discussion_steps,
    discussion_transfer,
)
from guided_descent.report.linear_representation_figures import (
    _curves,
    _dist_figure,
    _steps_figure,
    _transfer_figure,
)

DIST_FIGURE = "dist_vs_step.png"
STEPS_FIGURE = "steps_vs_kappa.png"
TRANSFER_FIGURE = "transfer.png"

# ------------------------------------------------------------------------------------- tables


def _steps_cell(entry: Entry | None, budget: int) -> str:
    """``median [min–max]`` of steps-to-0.1; values above the budget read ``>budget``."""
    if entry is None:
        return "-"
    steps = [s for s in entry["steps"] if s is not None]
    if not steps:
        return "-"
    med, lo, hi = entry["median_steps"], min(steps), max(steps)
    if lo == hi:
        text = _fmt_steps(med, budget)
    else:
        text = f"{_fmt_steps(med, budget)} [{_fmt_steps(lo, budget)}–{_fmt_steps(hi, budget)}]"
    diverged = sum(d is not None for d in entry["diverged_at"])
    if diverged:
        text += f" ({diverged} blew up)"
    return text


def _method_table(
    res: Mapping[str, Any],
    cell_text: Callable[[Entry | None], str],
    methods: Sequence[str] | None = None,
) -> str:
    """Methods as rows, ``(κ_x, κ_F)`` cells as columns."""
    cells = _cells(res)
    names = list(methods or res["methods"])
    headers = ["method"] + [f"κ_x={_k(kx)}, κ_F={_k(kf)}" for kx, kf in cells]
    rows = [[_label(m)] + [cell_text(_cell(res, m, kx, kf)) for kx, kf in cells] for m in names]
    return md.table(headers, rows)


def _number(key: str, digits: int = 3) -> Callable[[Entry | None], str]:
    """A table cell showing ``entry[key]`` (a number, or a per-seed list shown by its median)."""

    def text(entry: Entry | None) -> str:
        if entry is None:
            return "-"
        value = entry[key]
        if isinstance(value, list):
            value = _median(value)
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if digits >= 0 else f"{value:.3g}"

    return text


def _chosen_table(res: Mapping[str, Any]) -> str:
    tuned = [m for m, r in res["methods"].items() if r["grid"] is not None]
    if not tuned:
        return ""

    def text(entry: Entry | None) -> str:
        if entry is None:
            return "-"
        value = _hyper(entry["hyper"])
        return f"{value} (edge)" if entry["at_grid_edge"] else value

    return _method_table(res, text, tuned)


def _grid_table(res: Mapping[str, Any], method: str) -> str:
    """Cells x grid values: median steps-to-0.1 / median final distance, or when the race
    stopped the value."""
    r = res["methods"][method]
    grid = r["grid"]
    budget = res["steps"]
    rows = []
    for kx, kf in _cells(res):
        entry = _cell(res, method, kx, kf)
        if entry is None:
            continue
        by_value = {e["hyper"]: e for e in entry["grid"]}
        row: list[Any] = [f"{_k(kx)}, {_k(kf)}"]
        for value in grid:
            e = by_value.get(value)
            if e is None:
                row.append("-")
                continue
            if e["stopped_at"] is not None:
                row.append(f"stopped at {e['stopped_at']}")
                continue
            text = f"{_fmt_steps(e['median_steps'], budget)} / {e['median_final_dist']:.3f}"
            row.append(f"**{text}**" if value == entry["hyper"] else text)
        rows.append(row)
    name = r["hyper_name"]
    return md.table(["κ_x, κ_F"] + [f"{name} {_hyper(v)}" for v in grid], rows)


def _verdict_table(res: Mapping[str, Any]) -> str:
    rows = []
    for v in res["gauss_newton_verdicts"]:
        unstable = v["unstable_at_layerwise_damping"]
        rows.append(
            [
                f"{_k(v['kappa_x'])}, {_k(v['kappa_f'])}",
                f"{v['layerwise_steps']:.0f}",
                f"{v['gn_steps']:.0f} (damping {_hyper(v['gn_damping'])})",
                "yes" if v["slower"] else "no",
                "-" if unstable is None else ("yes" if unstable else "no"),
                "**holds**" if v["holds"] else "**fails**",
            ]
        )
    return md.table(
        [
            "κ_x, κ_F",
            "layer-wise median steps",
            "Gauss–Newton median steps (best damping)",
            "GN slower",
            "GN fails at the layer-wise damping",
            "claim 4 here",
        ],
        rows,
    )


# ------------------------------------------------------------------------------------ render


def _protocol(res: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    methods = res["methods"]
    budget = res["steps"]
    kxs, kfs = _kappas(res)
    grids = "; ".join(
        f"{_label(m)} {r['hyper_name']} ∈ {{{', '.join(_hyper(v) for v in r['grid'])}}}"
        for m, r in methods.items()
        if r["grid"] is not None
    )
    settings = "; ".join(
        f"{_label(m)}: " + ", ".join(f"{k} = {v}" for k, v in r["settings"].items())
        for m, r in methods.items()
        if r.get("settings")
    )
    return [
        (
            f"Inputs x = Σ_x^½ r in d_X = {config['d_x']} with Rademacher r; Σ_x has eigenvalues "
            "log-spaced from 1 to 1/κ_x, rescaled to trace d_X, and "
            f"{'Haar-random' if config['rotated'] else 'axis-aligned'} eigenvectors. Targets "
            f"y = F⋆G⋆x + ε with G⋆ ({config['k']} × {config['d_x']}) orthonormal rows drawn "
            f"independently of Σ_x, F⋆ ({config['d_y']} × {config['k']}) with singular values "
            f"log-spaced from 1 to 1/√κ_F, σ = {config['noise']:g}. The model is F G x with "
            f"loss ½·mean‖y − FGx‖², batch {config['batch_size']}, a fresh batch every step, "
            f"{budget} steps, {res['seeds']} seeds, cells κ_x ∈ {{{', '.join(map(_k, kxs))}}} "
            f"× κ_F ∈ {{{', '.join(map(_k, kfs))}}}. A seed fixes Σ_x's rotation, G⋆, F⋆'s "
            "singular vectors, the initial G (N(0, 1/d_X)) and F (N(0, 1/k) for the first-order "
            "and library methods, 0 for the layer-wise rule and Gauss–Newton) and the data "
            "stream; every method sees the same batches."
        ),
        "",
        (
            "The metric is the sine of the largest principal angle between the row spaces of G "
            f"and G⋆; steps-to-{res['target']:g} is the first step at which it is ≤ "
            f"{res['target']:g} (a run that never gets there, or blows up first, counts "
            f"{budget + 1})."
        ),
        "",
        (
            "Methods. The layer-wise sweep is the paper's alternating rule: a G-step "
            f"G ← G − η_G (FᵀF + λI)⁻¹ ∇_G L (Σ̂_x + λI)⁻¹ with η_G = {config['eta_g']:g}, then "
            "on a second fresh batch an F-step F ← F − η_F ∇_F L Σ̂_z⁻¹ with η_F = "
            f"{config['eta_f']:g}; λ is {config['damping']:g} times each matrix's mean "
            "eigenvalue, and one sweep (two batches) counts as one step. Its one-sided variant "
            "uses I instead of FᵀF. Gauss–Newton takes the full damped step (H + μI)⁻¹∇L on "
            "(F, G) with step size 1, μ relative to the mean eigenvalue of the Gauss–Newton "
            "matrix H, solved exactly through a Schur complement. SGD and Adam are the "
            "registry's torch.optim optimizers. K-FAC, Shampoo, SOAP and Muon are the library's, "
            "on nn.Sequential(Linear(d_X, k), Linear(k, d_Y)) without biases, one model per "
            f"seed, with registry defaults except: {settings or 'none'}."
        ),
        "",
        (
            f"Grids: {grids}. Selection rule, the same for every tuned method: in each "
            "(κ_x, κ_F) cell the value with the smallest median steps-to-0.1 wins; ties go to "
            "the smaller median final distance (a blown-up seed counts 1), then to the earlier "
            "grid value. The grid runs as a race: a value whose median can no longer match the "
            "best one is stopped, which selects the same winner as running it to the end. The "
            "Gauss–Newton run at the layer-wise damping is never stopped, because claim 4 needs "
            "its whole run. "
            + res.get("grid_history", "")
            + " '(edge)' in the table of chosen values marks a winner at the end of its grid."
        ),
        "",
        (
            f"Transfer: G is frozen (after {res['compare_at']} steps, the horizon of claims "
            "2–3; also at the end), and a new task with the same G⋆ but a fresh head (same "
            "singular values) and a covariance with the same spectrum in fresh Haar directions "
            f"is fit by least squares on n = {config['transfer_samples']} samples (4k by "
            "default: enough for the oracle's own fit to be accurate, small enough that a wrong "
            "subspace matters); the excess risk is the population risk minus that of the oracle "
            f"G⋆ fit on the same samples, averaged over {config['transfer_draws']} training sets."
        ),
    ]


def render(run_dir: Path) -> Path:
    """Write the figures and ``report.md`` for the ``linear-representation`` run in ``run_dir``."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    res = dict(summary["results"])
    res["_claims"] = summary["claims"]
    claims = summary["claims"]
    methods = res["methods"]
    budget = res["steps"]
    at = res["compare_at"]

    curves = _curves(read_metrics(run_dir), res)
    dist_path = _dist_figure(curves, res, run_dir / DIST_FIGURE)
    _steps_figure(res, run_dir / STEPS_FIGURE)
    transfer_path = _transfer_figure(res, run_dir / TRANSFER_FIGURE)

    parts = [
        "# linear-representation: learning a subspace under ill-conditioned inputs",
        "",
        "## Protocol",
        "",
        *_protocol(res, config),
        "",
        md.environment_line(env),
        "",
        (
            f"Wall-clock of the whole run: {res.get('wall_seconds', float('nan')):.0f} s on "
            f"{res.get('torch_threads', '?')} torch thread(s)."
        ),
        "",
        "## Claims",
        "",
        md.claims_line(claims),
        "",
        md.claims_table(claims),
        "",
    ]
    if "gauss_newton_verdicts" in res:
        parts += [
            "Claim 4 per cell (Gauss–Newton fails the layer-wise damping when half or more of "
            "its seeds blow up or never reach 0.1 there):",
            "",
            _verdict_table(res),
            "",
        ]
    parts += [
        "## Steps to 0.1",
        "",
        f"Median [min–max] over seeds at each method's chosen value; >{budget}: not reached.",
        "",
        _method_table(res, lambda e: _steps_cell(e, budget)),
        "",
        f"![Steps to dist ≤ {res['target']:g} against κ_x, log–log](./{STEPS_FIGURE})",
        "",
        *(f"- {s}" for s in discussion_steps(res)),
        "",
        "## Subspace distance",
        "",
        f"Median distance after {at} steps:",
        "",
        _method_table(res, _number("median_dist_compare")),
        "",
        f"Median distance after {budget} steps:",
        "",
        _method_table(res, _number("median_final_dist")),
        "",
    ]
    if dist_path is not None:
        parts += [f"![Subspace distance against step, per cell](./{DIST_FIGURE})", ""]
    parts += [f"- {s}" for s in discussion_dist(res)]
    parts += [
        "",
        "## Transfer",
        "",
        f"Median excess risk over the oracle G⋆, G frozen after {at} steps:",
        "",
        _method_table(res, _number("transfer_excess", -1)),
        "",
        f"The same with G frozen after {budget} steps:",
        "",
        _method_table(res, _number("transfer_excess_final", -1)),
        "",
    ]
    if transfer_path is not None:
        parts += [f"![Transfer excess risk against κ_x](./{TRANSFER_FIGURE})", ""]
    parts += [f"- {s}" for s in discussion_transfer(res)]
    parts += ["", "## Against the paper", ""]
    parts += [f"- {s}" for s in discussion_paper(res)]
    if "als_relative_error" in res:
        parts.append(
            "- Claim 5, measured on this run's problem size: one layer-wise sweep with η = 1, "
            "P_G = FᵀF, λ = 0 and full-batch statistics differs from alternating least squares "
            f"by {res['als_relative_error']:.2g} (relative, float64)."
        )
    parts += ["", "## Chosen hyper-parameters", "", _chosen_table(res), ""]
    for m, r in methods.items():
        if r["grid"] is None or len(r["grid"]) < 2:
            continue
        parts += [
            f"### {_label(m)}: grid",
            "",
            "Per cell and grid value: median steps-to-0.1 / median final distance (chosen in "
            "bold), or the step at which the race stopped the value.",
            "",
            _grid_table(res, m),
            "",
        ]
    parts += ["## Configuration", "", md.config_block(config), ""]
    path = run_dir / REPORT
    write_atomic(path, "\n".join(parts))
    return path


__all__ = [
    "DIST_FIGURE",
    "STEPS_FIGURE",
    "TRANSFER_FIGURE",
    "discussion_dist",
    "discussion_paper",
    "discussion_steps",
    "discussion_transfer",
    "render",
]
