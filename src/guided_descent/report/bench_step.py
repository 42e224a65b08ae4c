"""Report for ``guided-descent bench step``: step-time table, state memory, and a bar chart."""

from __future__ import annotations

from pathlib import Path

from guided_descent.experiments.records import CONFIG, ENV, REPORT, SUMMARY, read_json, write_atomic
from guided_descent.report.figures import pyplot, save_figure
from guided_descent.report.markdown import claims_table, config_block, environment_line, table

FIGURE = "step_time.png"


def _figure(rows: dict, path: Path) -> None:
    plt = pyplot()
    names = list(rows)
    median = [rows[n]["median_ms"] for n in names]
    mean = [rows[n]["mean_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], median, width=0.4, label="median step")
    ax.bar([i + 0.2 for i in x], mean, width=0.4, label="mean step (amortized refreshes)")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms per optimizer.step()")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def render(run_dir: Path) -> Path:
    config = read_json(run_dir / CONFIG)["config"]
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    results = summary["results"]
    rows = results["optimizers"]
    _figure(rows, run_dir / FIGURE)
    layout = results["layout"]
    lines = [
        "# bench step: the cost of optimizer.step()",
        "",
        f"Parameter shapes: GPT layout with {layout['n_layer']} layers, width {layout['d_model']}, "
        f"vocabulary {layout['vocab_size']}, context {layout['context']} "
        f"({results['parameters'] / 1e6:.1f}M parameters), fixed random gradients. Each optimizer "
        f"takes {config['warmup']} untimed warm-up steps, then {config['steps']} timed steps, "
        "each bracketed by device synchronisation. *median* is the typical step; *mean* "
        "includes the periodic preconditioner refreshes (amortized cost); ratios are to "
        "`torch.optim.AdamW(fused=True)` measured in the same process.",
        "",
        environment_line(env),
        "",
        "## Claims",
        "",
        claims_table(summary["claims"]),
        "",
        "## Step time and state memory",
        "",
        table(
            (
                "optimizer",
                "median ms",
                "mean ms",
                "max ms",
                "median / AdamW",
                "mean / AdamW",
                "state MB",
                "state B/param",
                "params updated",
            ),
            [
                (
                    name,
                    r["median_ms"],
                    r["mean_ms"],
                    r["max_ms"],
                    r["ratio_median_vs_adamw_fused"],
                    r["ratio_mean_vs_adamw_fused"],
                    r["state_bytes"] / 1e6,
                    r["state_bytes_per_param"],
                    r["params_updated"],
                )
                for name, r in rows.items()
            ],
        ),
        "",
    ]
    matrix = {n: r for n, r in rows.items() if "matrix_state_bytes_per_param" in r}
    if matrix:
        lines += [
            "State of the matrix groups alone (the hybrids' AdamW groups left out), bytes per "
            "parameter they update: "
            + ", ".join(f"{n} {r['matrix_state_bytes_per_param']:.2f}" for n, r in matrix.items())
            + ".",
            "",
        ]
    floors = {n: r for n, r in rows.items() if "floor_ms" in r}
    if floors:
        bw = results["copy_bandwidth_bytes_per_s"] / 1e12
        lines += [
            f"Memory-bandwidth floors at the measured copy bandwidth ({bw:.2f} TB/s):",
            "",
            table(
                ("optimizer", "floor ms", "median / floor"),
                [(n, r["floor_ms"], r["median_vs_floor"]) for n, r in floors.items()],
            ),
            "",
        ]
    precond = {n: r for n, r in rows.items() if r.get("precond_ms") is not None}
    if precond:
        world = results.get("world_size", 1)
        ranks = range(world)
        lines += [
            f"## Matrix work per rank ({world} process{'es' if world > 1 else ''})",
            "",
            "Time each rank spent on its own share of the Newton–Schulz iterations, "
            "eigendecompositions and inverse roots, per optimizer step, as wall time and as the "
            "process's CPU time (the work itself, whatever else runs on the machine; see "
            "docs/distributed.md). `param checksum`: the sum of squares of the parameters after "
            "the timed steps, the same for every number of processes.",
            "",
            table(
                (
                    "optimizer",
                    *(f"rank {k} ms" for k in ranks),
                    *(f"rank {k} CPU ms" for k in ranks),
                    "param checksum",
                ),
                [
                    (
                        n,
                        *(r.get("precond_ms_per_rank") or [r["precond_ms"]]),
                        *(r.get("precond_cpu_ms_per_rank") or [r.get("precond_cpu_ms")]),
                        f"{r['param_checksum']:.12g}" if r.get("param_checksum") else "",
                    )
                    for n, r in precond.items()
                ],
            ),
            "",
        ]
    if "muon" in rows and "speedup_vs_torch_muon" in rows["muon"]:
        lines += [
            f"Muon vs `torch.optim.Muon` on the same hidden matrices: "
            f"{rows['muon']['speedup_vs_torch_muon']:.2f}x faster (median step).",
            "",
        ]
    lines += [f"![step time per optimizer](./{FIGURE})", "", "## Configuration", "",
              config_block(config), ""]
    path = run_dir / REPORT
    write_atomic(path, "\n".join(lines))
    return path
