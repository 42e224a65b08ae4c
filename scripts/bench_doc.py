"""Print the markdown block docs/benchmarks.md shows for each `bench train` run directory.

    python scripts/bench_doc.py RUN_DIR [RUN_DIR ...]

Everything comes from the run's files: the command and environment from ``env.json``, the table
and the claims from ``summary.json``. Copy the output into the docs; do not edit the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from guided_descent.experiments.records import (
    ENV,
    SUMMARY,
    claim_reason,
    claim_verdict,
    read_json,
)
from guided_descent.report.bench_train import compact_table
from guided_descent.report.markdown import fmt


def block(run_dir: Path) -> str:
    env = read_json(run_dir / ENV)
    summary = read_json(run_dir / SUMMARY)
    res = summary["results"]
    target = res["targets"]["primary"]
    lines = [
        f"`{env.get('command', '(command not recorded)')}` — {env.get('torch_threads')} "
        f"threads, {res['world_size']} process(es), wall {res['wall_seconds']:.0f} s, "
        f"{env.get('created')}, commit `{(env.get('git_commit') or 'unknown')[:7]}`",
        "",
        f"Target: {target['text']}"
        + (f" = {fmt(target['value'], 4)}" if target.get("value") is not None else "")
        + ".",
        "",
        compact_table(res),
        "",
    ]
    for claim in summary["claims"]:
        why = claim_reason(claim)
        lines.append(f"- **{claim_verdict(claim)}** `{claim['name']}`: value "
                     f"{fmt(claim['value'], 3)} (needs {claim['op']} {fmt(claim['threshold'])})"
                     + (f" — {why}" if why else ""))
    for note in res.get("ranking_notes", []):
        lines.append(f"- not evaluated: {note}")
    for name, reason in (res.get("skipped") or {}).items():
        lines.append(f"- skipped `{name}`: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for arg in argv:
        print(block(Path(arg)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
