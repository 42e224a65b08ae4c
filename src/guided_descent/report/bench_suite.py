"""Report for ``guided-descent bench suite``: the leaderboard, its figure, every sub-run's report.

Everything is read from the suite's directory: its ``summary.json`` (the leaderboard and its
verdicts), ``env.json`` and ``config.json``, and each sub-run's files. ``render`` writes
``report.md`` (the leaderboard, then links to the sub-reports) and ``leaderboard.png``;
:func:`publish` writes the same leaderboard to ``docs/leaderboard.md`` (figure under
``docs/figures/``) and fills the marked regions of the recipes and the README:
``<!-- suite:NAME -->`` ... ``<!-- /suite:NAME -->``, NAME one of :data:`REGIONS`.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    REPORT,
    SUMMARY,
    claim_reason,
    claim_verdict,
    read_json,
    write_atomic,
)
from guided_descent.report.figures import pyplot, save_figure
from guided_descent.report.markdown import claims_table, fmt, table

FIGURE = "leaderboard.png"
LEADERBOARD = "leaderboard.md"
BOUND = {"lower": "≥ ", "upper": "≤ ", "mixed": "~ ", "exact": "", "none": ""}


def suite_summary(run_dir: Path) -> dict[str, Any]:
    """The suite's leaderboard and verdicts re-derived from its sub-runs' files by this version
    of the code (so a report of an older run shows every statistic the current one computes)."""
    from guided_descent.experiments.bench_suite import rederive

    return rederive(Path(run_dir))


def _jobs_note(res: dict[str, Any]) -> str:
    """Said next to the wall time when workloads trained side by side (``--jobs``)."""
    jobs = res.get("jobs", 1)
    if jobs <= 1:
        return ""
    return f", with {jobs} workloads training at once (each workload in a process of its own)"


def _ratio_cell(stats: dict[str, Any]) -> str:
    """``median [min–max]`` of ratios, with ≥ / ≤ when they are bounds from missed targets."""
    if not stats or stats.get("median") is None:
        return "both missed"
    mark = BOUND.get(stats.get("kind", "exact"), "")
    lo, med, hi = stats["min"], stats["median"], stats["max"]
    text = f"{mark}{fmt(med)}" + ("" if lo == hi else f" [{fmt(lo)}–{fmt(hi)}]")
    if stats.get("missing"):
        text += f" ({stats['missing']} seed(s) both missed)"
    return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _interval(agg: dict[str, Any]) -> str:
    if agg.get("value") is None:
        return "-"
    mark = BOUND.get(agg.get("kind"), "")
    return f"{mark}{fmt(agg['value'])} [{fmt(agg['low'])}–{fmt(agg['high'])}]"


def _steps_sentence(board: dict[str, Any], minimum: int) -> str:
    """The headline's second half: the same across workloads in steps, free of machine load."""
    from guided_descent.experiments.bench.leaderboard import interval_outcome

    fewer, more, unsure = [], [], []
    steps = {n: a["steps"] for n, a in board["aggregate"].items() if "steps" in a}
    for name, agg in sorted(steps.items(), key=lambda kv: kv[1].get("value") or math.inf):
        v = interval_outcome(agg, minimum).verdict
        (fewer if v == "PASS" else more if v == "FAIL" else unsure).append(
            f"{name} {_interval(agg)}")
    if not steps:
        return ""
    text = "In steps to target (what a method does per update, free of the machine's load): "
    text += ("fewer than AdamW beyond the interval: " + ", ".join(fewer) + "; " if fewer
             else "none takes fewer steps than AdamW beyond the interval; ")
    if more:
        text += "more: " + ", ".join(more) + "; "
    if unsure:
        text += "not decided: " + ", ".join(unsure) + "; "
    return text.rstrip("; ") + "."


def headline(summary: dict[str, Any]) -> str:
    """One sentence per track from the aggregate: who beats AdamW beyond the interval, who is
    slower, and where AdamW wins."""
    res = summary["results"]
    verdicts = {c["name"]: c for c in summary["claims"]}
    parts = []
    for track, board in res["tracks"].items():
        faster, slower, unsure = [], [], []
        for name, agg in sorted(board["aggregate"].items(),
                                key=lambda kv: kv[1].get("value") or math.inf):
            c = verdicts.get(f"leaderboard: {name} vs adamw ({track})")
            v = claim_verdict(c) if c else "UNDECIDED"
            cell = f"{name} {_interval(agg)}"
            (faster if v == "PASS" else slower if v == "FAIL" else unsure).append(cell)
        n = len(res["workloads"])
        plural = "s" if n != 1 else ""
        text = (f"**{track} track** ({n} workload{plural}, {res['seeds']} seeds, {res['device']}): "
                "time to target as a multiple of AdamW's, geometric mean [interval]. ")
        text += ("Faster than AdamW beyond the interval: " + ", ".join(faster) + ". "
                 if faster else "No optimizer is faster than AdamW beyond the interval. ")
        if slower:
            text += "AdamW is faster than: " + ", ".join(slower) + ". "
        if unsure:
            text += "Not decided: " + ", ".join(unsure) + ". "
        text += _steps_sentence(board, res.get("min_seeds", 3))
        parts.append(text.strip())
    return "\n\n".join(parts)


def leaderboard_markdown(run_dir: Path, figure: str, links: bool = True,
                         summary: dict[str, Any] | None = None) -> str:
    """The leaderboard as Markdown; ``figure`` is the image path to link; ``links``: link each
    workload's sub-report (inside the run directory) rather than name its folder (in docs)."""
    run_dir = Path(run_dir)
    summary = summary or suite_summary(run_dir)
    env = read_json(run_dir / ENV)
    config = read_json(run_dir / CONFIG)["config"]
    res = summary["results"]
    boot = res["bootstrap"]
    q_lo, q_hi = (100 * q for q in boot["quantiles"])
    lines = [
        "# Leaderboard: time to target against AdamW",
        "",
        *(["This is a `--quick` suite (CI-sized variants of every workload): it exercises the "
           "machinery; its numbers say nothing about the full-size workloads.", ""]
          if res.get("ci") else []),
        f"Command: `{env.get('command', '(not recorded)')}`; commit "
        f"`{(env.get('git_commit') or 'unknown')[:12]}`; device: {res['device']}; torch "
        f"{env.get('torch', '?')}; run at {env.get('created', '?')}; wall "
        f"{_duration(res.get('wall_seconds', 0))}{_jobs_note(res)}.",
        "",
        "How to read it. Per workload and seed the ratio is the optimizer's training time to the "
        "workload's target over AdamW's, measured in the same run (same seeds, data order, "
        "schedule family and clock; BENCHMARKS.md \"Measuring fairly\"). A run reaches the "
        "target at its first evaluation that meets it, provided its last evaluation still "
        "does. `≥`: the optimizer missed the target in some seed, so the ratio is a lower "
        "bound (its whole training time); `≤`: AdamW missed, an upper bound. Across "
        "workloads: the geometric mean of the ratios (each workload weighted equally; rule 6), "
        f"with a percentile bootstrap over seeds ({boot['resamples']:,} resamples, numpy "
        f"`default_rng({boot['seed']})`, interval {q_lo:g}–{q_hi:g} %: each end one-sided at "
        "p = 0.001, rule 4's z = 3.09). With 3 seeds per workload the bootstrap cannot see more "
        "spread than the seeds show. A verdict PASS needs the whole interval below 1, FAIL the "
        "whole interval above 1; anything else is UNDECIDED with the reason. The steps column "
        "is the same statistic over steps to target: what a method does per update, untouched "
        "by whatever else ran on the machine, which a time ratio measures too.",
        "",
        "## Headline",
        "",
        headline(summary),
        "",
        f"![time to target relative to AdamW, per optimizer and track]({figure})",
        "",
    ]
    verdicts = {c["name"]: c for c in summary["claims"]}
    for track, board in res["tracks"].items():
        lines += [f"## {track.capitalize()} track", ""]
        if track == "tuned":
            lines += [
                "Every optimizer (ours and other libraries') tried the learning-rate multipliers "
                f"{', '.join(f'{f:g}' for f in res['sweep_factors'])} of its defaults on seed 0; "
                "the one whose run ended with the lowest validation loss ran the other seeds.",
                "",
            ]
        rows = []
        for name, agg in sorted(board["aggregate"].items(),
                                key=lambda kv: kv[1].get("value") or math.inf):
            c = verdicts.get(f"leaderboard: {name} vs adamw ({track})", {})
            rows.append((name, _interval(agg), _interval(agg.get("steps") or {}),
                         len(agg.get("workloads", [])),
                         ", ".join(agg.get("excluded", [])) or "-",
                         f"**{claim_verdict(c)}**" if c else "-", claim_reason(c) or "-"))
        lines += [
            table(("optimizer", "time × AdamW, geometric mean [interval]",
                   "steps × AdamW, geometric mean [interval]", "workloads",
                   "left out (both missed)", "verdict", "why"), rows),
            "",
        ]
        for workload, tab in board["workloads"].items():
            target = board["targets"][workload]
            value = f" = {fmt(target['value'], 4)}" if target.get("value") is not None else ""
            where = (f"[full report]({track}/{workload}/{REPORT})" if links else
                     f"Full report: `{track}/{workload}/{REPORT}` in the suite's run directory.")
            lines += [f"### {workload}: {target['text']}{value}", "", where, ""]
            lines += [table(
                ("optimizer", "time × AdamW", "steps × AdamW", "reached", "faster beyond spread",
                 "opt step × AdamW", "lr ×"),
                [(name, _ratio_cell(r["seconds"]), _ratio_cell(r["steps"]),
                  f"{r['reached']}/{r['seeds']}",
                  "-" if r["faster_beyond_spread"] is None else r["faster_beyond_spread"],
                  r["opt_step_ms_ratio"], r["lr_factor"])
                 for name, r in tab.items()]), ""]
            claims = board["claims"].get(workload, [])
            if claims:
                lines += ["Claims of this run, re-derived from its files:", "",
                          claims_table(claims), ""]
    from guided_descent.experiments.bench_suite import BUDGET

    lines += ["## Verdicts across workloads", "", claims_table(summary["claims"]), "",
              "## Budget", "",
              f"This suite took {_duration(res.get('wall_seconds', 0))} of wall-clock time "
              f"({res.get('reused_runs', 0)} runs of the tuned track taken from the defaults "
              "track). The stated budgets on 2 CPU cores: about "
              f"{BUDGET['quick']} minute(s) for `--quick`, about {BUDGET['full']} minutes for "
              "the full suite (the arithmetic: docs/leaderboard.md, \"Budget\").", "",
              "## Configuration", "", "```",
              *(f"{k} = {v}" for k, v in config.items()), "```", ""]
    return "\n".join(lines)


def figure(run_dir: Path, path: Path, summary: dict[str, Any] | None = None) -> None:
    """Dot-and-interval plot: per optimizer the geometric mean (dot) and its bootstrap interval
    (bar), one panel per track; small grey marks are the per-workload geometric means."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    res = (summary or suite_summary(run_dir))["results"]
    plt = pyplot()
    tracks = list(res["tracks"])
    names = sorted({n for t in tracks for n in res["tracks"][t]["aggregate"]})
    fig, axes = plt.subplots(1, len(tracks), figsize=(5.0 * len(tracks), 0.45 * len(names) + 1.6),
                             squeeze=False, sharey=True)
    for ax, track in zip(axes[0], tracks, strict=True):
        board = res["tracks"][track]
        for i, name in enumerate(names):
            agg = board["aggregate"].get(name)
            for tab in board["workloads"].values():
                r = tab.get(name)
                vals = [v for v, _ in (r or {}).get("seconds_per_seed", []) if v]
                if vals:
                    ax.plot(math.exp(float(np.mean(np.log(vals)))), i, "|", color="0.6", ms=8)
            if agg and agg.get("value") is not None:
                ax.plot([agg["low"], agg["high"]], [i, i], color="C0", lw=2.5)
                marker = {"lower": ">", "upper": "<"}.get(agg.get("kind"), "o")
                ax.plot(agg["value"], i, marker, color="C3", ms=7)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xscale("log")
        plain = FuncFormatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.set_xlabel("time to target × AdamW (log; left of 1: faster)")
        ax.set_title(f"{track} track", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"geometric mean over workloads (dot), {100 * res['bootstrap']['quantiles'][0]:g}"
                 f"–{100 * res['bootstrap']['quantiles'][1]:g} % bootstrap interval (bar), "
                 f"per workload (grey); ▶ / ◀: a lower / upper bound (a missed target); "
                 f"{res['device']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def render(run_dir: Path, summary: dict[str, Any] | None = None) -> Path:
    """Render every sub-run's report, then the leaderboard as ``report.md`` and its figure
    (``summary``: the suite's re-derived summary, when the caller already has it)."""
    from guided_descent.report import is_run
    from guided_descent.report import render as render_one

    run_dir = Path(run_dir)
    for track_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        for sub in sorted(p for p in track_dir.iterdir() if p.is_dir() and is_run(p)):
            if (sub / SUMMARY).is_file():
                render_one(sub)
    summary = summary or suite_summary(run_dir)  # re-derived once for the page and the figure
    figure(run_dir, run_dir / FIGURE, summary)
    text = leaderboard_markdown(run_dir, f"./{FIGURE}", summary=summary)
    write_atomic(run_dir / LEADERBOARD, text)
    path = run_dir / REPORT
    write_atomic(path, text)
    return path


# The regions of docs/recipes.md and README.md that publish() fills from a suite.
REGIONS = ("headline", "mlp", "cnn", "transformer", "rnn", "matrix-cost")
# Which workloads stand for which kind of model in the recipes.
KINDS = {
    "mlp": ("digits-mlp", "mnist1d-mlp", "digits-autoencoder"),
    "cnn": ("digits-cnn", "mnist1d-cnn"),
    "transformer": ("mnist1d-transformer", "charlm"),
    "rnn": ("mnist1d-gru",),
}


def _region_text(region: str, summary: dict[str, Any], link: str) -> str:
    """The generated text of one marked region."""
    res = summary["results"]
    if region == "headline":
        return headline(summary) + f"\n\nFull table and figure: [{link}]({link})."
    if region == "matrix-cost":
        rows = []
        for track, board in res["tracks"].items():
            for workload, tab in board["workloads"].items():
                for name, r in tab.items():
                    if r.get("opt_step_ms_ratio") is not None:
                        rows.append((track, workload, name, r["opt_step_ms_ratio"],
                                     _ratio_cell(r["steps"]), _ratio_cell(r["seconds"])))
        return ("Measured by the suite (optimizer step time, steps and time to target, each as a "
                f"multiple of AdamW's; [{link}]({link})):\n\n" + table(
                    ("track", "workload", "optimizer", "opt step × AdamW", "steps × AdamW",
                     "time × AdamW"), rows))
    workloads = [w for w in KINDS.get(region, ()) if w in res["workloads"]]
    if not workloads:
        return ("This suite run has no workload of this kind of model: it supports no "
                "recommendation here.")
    rows = []
    for track, board in res["tracks"].items():
        for w in workloads:
            tab = board["workloads"].get(w, {})
            ranked = sorted(tab.items(), key=lambda kv: kv[1]["seconds"].get("median") or math.inf)
            best = [f"{n} {_ratio_cell(r['seconds'])} (lr ×{r['lr_factor']:g})"
                    for n, r in ranked[:3]]
            rows.append((track, w, "; ".join(best) or "-"))
    return (f"From the suite ([{link}]({link})): the three fastest to target per workload, time "
            "as a multiple of AdamW's (median [range] over seeds; lr × is the tuned "
            "multiplier).\n\n" + table(("track", "workload", "fastest three"), rows))


def fill_regions(text: str, summary: dict[str, Any], link: str,
                 given: dict[str, str] | None = None) -> str:
    """Replace the body of every ``<!-- suite:NAME -->`` ... ``<!-- /suite:NAME -->`` region
    (``given`` supplies the text of regions drawn elsewhere, e.g. the whole leaderboard)."""
    given = given or {}

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in given:
            body = given[name]
        else:
            body = _region_text(name, summary, link) if name in REGIONS else m.group(2)
        return f"<!-- suite:{name} -->\n{body}\n<!-- /suite:{name} -->"

    return re.sub(r"<!-- suite:([a-z-]+) -->\n(.*?)\n?<!-- /suite:\1 -->", replace, text,
                  flags=re.S)


def publish(run_dir: Path, docs: Path) -> Path:
    """Write the leaderboard to ``docs/leaderboard.md`` (figure: ``docs/figures/``) and fill the
    marked regions of ``docs/recipes.md`` and ``docs/../README.md`` where they exist."""
    run_dir, docs = Path(run_dir), Path(docs)
    summary = suite_summary(run_dir)
    render(run_dir, summary)
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / FIGURE, docs / "figures" / FIGURE)
    out = docs / LEADERBOARD
    board = leaderboard_markdown(run_dir, f"figures/{FIGURE}", links=False, summary=summary)
    marker = "<!-- suite:leaderboard -->"
    if out.is_file() and marker in out.read_text():
        # The page keeps its written sections; the measured leaderboard goes in its region,
        # headings one level down.
        body = "\n".join("#" + line if line.startswith("#") else line
                         for line in board.splitlines())
        write_atomic(out, fill_regions(out.read_text(), summary, LEADERBOARD,
                                       {"leaderboard": body}))
    else:
        write_atomic(out, board)
    for target, link in ((docs / "recipes.md", LEADERBOARD),
                         (docs.parent / "README.md", f"{docs.name}/{LEADERBOARD}")):
        if target.is_file():
            text = target.read_text()
            filled = fill_regions(text, summary, link)
            if filled != text:
                write_atomic(target, filled)
    return out


__all__ = ["FIGURE", "LEADERBOARD", "REGIONS", "fill_regions", "headline", "leaderboard_markdown",
           "publish", "render"]
