"""Report for ``guided-descent bench train``: time-to-target tables and training curves.

Everything is read from the run directory: ``summary.json`` for the per-optimizer statistics and
claims, ``metrics.jsonl`` for the curves (one ``event="eval"`` record per evaluation, tagged with
optimizer, seed and learning-rate factor), ``config.json`` and ``env.json`` for the context.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from guided_descent.experiments.records import (
    CONFIG,
    ENV,
    REPORT,
    SUMMARY,
    read_json,
    read_metrics,
    write_atomic,
)
from guided_descent.report.figures import pyplot, save_figure
from guided_descent.report.markdown import (
    claims_table,
    config_block,
    environment_line,
    fmt,
    table,
)

STEPS_FIGURE = "loss_vs_steps.png"
TIME_FIGURE = "loss_vs_time.png"


def _num(x: Any) -> float:
    """A number from summary.json, where inf is stored as the string ``"inf"``."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        return float(x)
    return float(x)


def _spread(stats: dict[str, Any] | None, digits: int = 3) -> str:
    """``median [min-max]``; a miss (inf) reads ``miss``."""
    if not stats or stats.get("median") is None:
        return "-"

    def one(v: Any) -> str:
        v = _num(v)
        if math.isinf(v):
            return "miss"
        # Step counts are medians of integers: print them as integers when they are.
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else fmt(v, digits)

    lo, med, hi = (stats[k] for k in ("min", "median", "max"))
    if _num(lo) == _num(hi):
        return one(med)
    return f"{one(med)} [{one(lo)}–{one(hi)}]"


def curves(run_dir: Path, lr_factors: dict[str, float]) -> dict[str, dict[int, list[dict]]]:
    """optimizer -> seed -> its evaluation records (step order), at the chosen LR factor."""
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in read_metrics(run_dir):
        if rec.get("event") != "eval":
            continue
        name = rec.get("optimizer")
        if name not in lr_factors or rec.get("lr_factor") != lr_factors[name]:
            continue
        out[name][rec["seed"]].append(rec)
    return out


def _aligned(per_seed: dict[int, list[dict]], key: str, x_key: str
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (median over seeds), and the median, min and max of ``key`` at each evaluation step."""
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for recs in per_seed.values():
        for r in recs:
            y = r.get(key)
            if y is None or isinstance(y, str):
                continue
            by_step[r["step"]].append((float(r.get(x_key, r["step"])), float(y)))
    steps = sorted(by_step)
    x = np.array([np.median([p[0] for p in by_step[s]]) for s in steps])
    ys = [[p[1] for p in by_step[s]] for s in steps]
    return (x, np.array([np.median(v) for v in ys]), np.array([min(v) for v in ys]),
            np.array([max(v) for v in ys]))


def _figure(data: dict[str, dict[int, list[dict]]], keys: list[str], x_key: str, xlabel: str,
            targets: dict[str, float | None], peers: set[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    # Ours solid, other libraries dashed; tab20 keeps up to 20 curves apart.
    colors = plt.get_cmap("tab20").colors
    for ax, key in zip(axes[0], keys, strict=True):
        positive = True
        for i, (name, per_seed) in enumerate(data.items()):
            x, med, lo, hi = _aligned(per_seed, key, x_key)
            if x_key == "train_seconds":
                keep = x > 0  # step 0 sits at time 0, off a log axis
                x, med, lo, hi = x[keep], med[keep], lo[keep], hi[keep]
            if not len(x):
                continue
            positive &= bool((lo > 0).all())
            (line,) = ax.plot(x, med, lw=1.5, label=name, color=colors[(2 * i) % 20 + (i >= 10)],
                              ls="--" if name in peers else "-")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        if key in targets and targets[key] is not None:
            ax.axhline(targets[key], color="black", lw=0.8, ls="--", label="target")
        if positive and not key.endswith("acc"):
            ax.set_yscale("log")
        if x_key == "train_seconds":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    # One legend for all panels, outside them: with a dozen optimizers it would hide the curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               frameon=False)
    fig.tight_layout()
    axes[0][0].set_title("median over seeds; band: min-max", fontsize=8)
    save_figure(fig, path, dpi=90)


def render(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    res = summary["results"]
    rows: dict[str, dict[str, Any]] = res["optimizers"]
    w = res["workload"]
    metric, loss_metric = w["metric"], w["loss_metric"]
    targets = res["targets"]
    primary, adamw_t = targets["primary"], targets["adamw"]

    data = curves(run_dir, res["lr_factors"])
    keys = [loss_metric] + ([metric] if metric != loss_metric else [])
    lines_at = {adamw_t["metric"]: adamw_t["value"]}
    if primary["value"] is not None:
        lines_at[primary["metric"]] = primary["value"]
    peers = set(res.get("peers") or {})
    _figure(data, keys, "step", "optimizer steps", lines_at, peers, run_dir / STEPS_FIGURE)
    _figure(data, keys, "train_seconds", "training seconds (clocked steps only)", lines_at,
            peers, run_dir / TIME_FIGURE)

    layout = res["problem"]
    seeds = config["seeds"]
    lines = [
        f"# bench train: {res['task']}",
        "",
        f"{w['summary']}. Budget {res['budget_steps']} steps"
        + (f" or {res['budget_minutes']} minutes" if res["budget_minutes"] else "")
        + f", batch {res['batch_size']}, evaluation every {res['eval_every']} steps, "
        f"{seeds} seed(s); schedule {config['schedule']} for every optimizer"
        + (f", EMA {config['ema_decay']} evaluated" if config["ema_decay"] else "")
        + (f", gradient clipping {res['clip']}" if res["clip"] else "")
        + (f", {res['autocast']} autocast" if res["autocast"] else "")
        + (f"; data-parallel on {res['world_size']} processes (DDP, each computing 1/"
           f"{res['world_size']} of every batch; times are rank 0's)"
           if res.get("world_size", 1) > 1 else "")
        + ". Times clock training steps only (synchronised), after untimed warm-up steps and a "
        "state restore; optimizers run without their per-step finiteness check "
        "(`on_nonfinite=\"off\"`).",
        "",
        environment_line(env),
        "",
        f"Target (claims): **{primary['text']}**"
        + (f" = {fmt(primary['value'], 4)}" if primary.get("value") is not None else "")
        + f". Expected (BENCHMARKS.md): {w['expected']}.",
        "",
        "## Claims",
        "",
        *(["This is the CI-sized variant (`--quick`): a smaller model, data and budget. The "
           "targets and expected rankings belong to the full size, so verdicts here say nothing "
           "about them; these claims exercise the machinery.", ""] if config.get("ci") else []),
        "A ranking passes only when its winner reaches the target in every seed (at the end of "
        "its schedule) and is ahead in every seed with paired gains that clear 3.09 standard "
        "errors (BENCHMARKS.md rule 4); with fewer than 3 seeds (5 on a GPU), nobody at the "
        "target, or a run cut short by the clock it is UNDECIDED, with the reason.",
        "",
        claims_table(summary["claims"]),
        "",
    ]
    for note in res.get("ranking_notes", []):
        lines.append(f"- Not evaluated: {note}")
    if res.get("ranking_notes"):
        lines.append("")
    lines += [
        "## Time to target",
        "",
        "Median over seeds [min–max]; a run reaches the target at the first evaluation that "
        "meets it, provided its last evaluation still does; a miss counts as budget + 1 steps "
        "and has no time. "
        "*x AdamW* columns are ratios of medians to AdamW in this run (≤: AdamW missed, so the "
        "ratio is a bound); *beyond spread*: faster than AdamW in every seed with the paired "
        "mean gain ≥ 3.09 standard errors.",
        "",
        table(
            ("optimizer", f"final {metric}", "steps to target", "reached", "samples to target",
             "seconds to target", "steps x AdamW", "seconds x AdamW",
             "beyond spread (steps / s)"),
            [
                (
                    name,
                    _spread(r["final_metric"], 4),
                    _spread(r.get("target", {}).get("steps")),
                    _reached(r.get("target"), r["seeds"]),
                    _spread(r.get("target", {}).get("samples")),
                    _spread(r.get("target", {}).get("seconds")),
                    _bound(r["vs_adamw"]),
                    r["vs_adamw"].get("seconds_to_target"),
                    _beyond(r.get("faster_than_adamw_beyond_spread")),
                )
                for name, r in rows.items()
            ],
        ),
        "",
        *_extra_target_tables(res, rows),
        f"Against AdamW's final {adamw_t['metric']} ({fmt(adamw_t['value'], 4)}):",
        "",
        table(
            ("optimizer", f"final {loss_metric}", "steps", "reached", "seconds"),
            [
                (name, _spread(r["final_loss"], 4), _spread(r.get("adamw_target", {})
                                                            .get("steps")),
                 f"{r.get('adamw_target', {}).get('reached', 0)}/{r['seeds']}",
                 _spread(r.get("adamw_target", {}).get("seconds")))
                for name, r in rows.items()
            ],
        ),
        "",
        "## Cost per step and memory",
        "",
        table(
            ("optimizer", "opt step ms", "x AdamW", "train step ms", "x AdamW", "state MB",
             "state B/param", "x AdamW", "finite"),
            [
                (name, _spread(r["opt_step_ms"]), r["vs_adamw"].get("opt_step_ms"),
                 _spread(r["step_ms"]), r["vs_adamw"].get("step_ms"), r["state_bytes"] / 1e6,
                 r["state_bytes_per_param"], r["vs_adamw"].get("state_bytes"), r["finite"])
                for name, r in rows.items()
            ],
        ),
        "",
        f"![{loss_metric} vs steps](./{STEPS_FIGURE})",
        "",
        f"![{loss_metric} vs time](./{TIME_FIGURE})",
        "",
    ]
    if res.get("sweep"):
        factors = sorted({f for s in res["sweep"].values() for f in s}, key=float)
        lines += [
            "## Learning-rate sweep (seed 0)",
            "",
            f"Final {loss_metric} at each multiple of the default learning rates; the lowest "
            "is kept for every seed.",
            "",
            table(("optimizer", *[f"x{f}" for f in factors], "chosen"),
                  [(n, *[s.get(f) for f in factors], res["lr_factors"][n])
                   for n, s in res["sweep"].items()]),
            "",
        ]
    peers = res.get("peers") or {}
    skipped = res.get("skipped") or {}
    if peers or skipped:
        lines += ["## Other libraries", ""]
        if peers:
            lines += [
                "Each peer updates the hidden matrices our router gives a matrix method; the "
                "rest go to `torch.optim.AdamW` with the AdamW settings of our counterpart.",
                "",
                table(("name", "class", "version", "counterpart", "note"),
                      [(n, p["class"], p["version"], p["counterpart"], rows[n]["note"] or "")
                       for n, p in peers.items()]),
                "",
            ]
        for name, reason in skipped.items():
            lines.append(f"- skipped `{name}`: {reason}")
        if skipped:
            lines.append("")
    lines += [
        "## Hyper-parameters (per param group)",
        "",
        *([("Changed from the registry defaults (`--hyper`): " + "; ".join(
            f"{n}: " + ", ".join(f"{k}={v}" for k, v in kw.items())
            for n, kw in res["overrides"].items()) + "."), ""] if res.get("overrides") else []),
        table(("optimizer", "groups"),
              [(n, "; ".join(", ".join(f"{k}={fmt(v, 4) if isinstance(v, float) else v}"
                                       for k, v in g.items()) for g in groups))
               for n, groups in res["hyperparams"].items()]),
        "",
        "## Problem and versions",
        "",
        "```",
        *(f"{k} = {v}" for k, v in layout.items()),
        *(f"{k} = {v}" for k, v in res["versions"].items()),
        "```",
        "",
        "## Configuration",
        "",
        config_block(config),
        "",
    ]
    path = run_dir / REPORT
    write_atomic(path, "\n".join(lines))
    return path


def _reached(hits: dict[str, Any] | None, seeds: int) -> str:
    """``reached/seeds``, and how many runs met the target mid-run but not at the end."""
    if not hits:
        return f"0/{seeds}"
    lost = hits.get("lost", 0)
    return f"{hits['reached']}/{seeds}" + (f" ({lost} lost by the end)" if lost else "")


def _extra_target_tables(res: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    """One table per further target the task publishes (charlm: the full 1.60 beside 1.90)."""
    out: list[str] = []
    for label in res.get("extra_targets", []):
        target = res["targets"][label]
        out += [
            f"At the {label} target, {target['text']}:",
            "",
            table(("optimizer", "steps to target", "reached", "seconds to target"),
                  [(name, _spread(r["extra_targets"][label]["steps"]),
                    _reached(r["extra_targets"][label], r["seeds"]),
                    _spread(r["extra_targets"][label]["seconds"]))
                   for name, r in rows.items()]),
            "",
        ]
    return out


def _bound(ratios: dict[str, Any]) -> str:
    """The steps ratio, written ``≤ x`` when AdamW missed the target (its count is budget + 1)."""
    value = ratios.get("steps_to_target")
    if value is None:
        return "-"
    return ("≤ " if ratios.get("steps_to_target_is_bound") else "") + fmt(value)


def _beyond(flags: dict[str, bool] | None) -> str:
    if not flags:
        return "-"
    return " / ".join("yes" if flags[k] else "no" for k in ("steps", "seconds"))


def compact_table(results: dict[str, Any]) -> str:
    """The headline table of a run, for docs: target, steps/samples/seconds to it, cost, memory.

    Ratios are to AdamW from the same run; an optimizer run at a swept learning rate is shown
    with its multiplier.
    """
    rows: dict[str, dict[str, Any]] = results["optimizers"]
    metric = results["workload"]["metric"]

    overrides = results.get("overrides") or {}

    def label(name: str, r: dict[str, Any]) -> str:
        changes = [f"{k}={v}" for k, v in overrides.get(name, {}).items()]
        factor = r.get("lr_factor", 1.0)
        if factor != 1.0:
            changes.append(f"lr ×{factor:g}")
        return f"{name} ({', '.join(changes)})" if changes else name

    return table(
        ("optimizer", f"final {metric}", "steps to target", "reached", "steps × AdamW",
         "samples to target", "seconds to target", "s × AdamW", "opt step ms", "× AdamW",
         "state B/param"),
        [
            (
                label(name, r),
                _spread(r["final_metric"], 3),
                _spread(r.get("target", {}).get("steps")),
                _reached(r.get("target"), r["seeds"]),
                _bound(r["vs_adamw"]),
                _spread(r.get("target", {}).get("samples")),
                _spread(r.get("target", {}).get("seconds")),
                r["vs_adamw"].get("seconds_to_target"),
                _spread(r["opt_step_ms"]),
                r["vs_adamw"].get("opt_step_ms"),
                r["state_bytes_per_param"],
            )
            for name, r in rows.items()
        ],
    )
