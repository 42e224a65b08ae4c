"""Reports: tables and figures drawn from a run directory's files, never by re-training.

``render(run_dir)`` reads ``config.json`` to learn the experiment, then calls
``guided_descent.report.<experiment>.render(run_dir)`` (``-`` in the name read as ``_``), which
writes the PNG figures and ``report.md`` and returns the report's path. A directory whose
sub-directories are runs (what ``guided-descent run`` writes for the flagship) gets an index
``report.md`` that joins theirs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from guided_descent.experiments.records import (
    CONFIG,
    REPORT,
    SUMMARY,
    RunDirError,
    read_json,
    write_atomic,
)
from guided_descent.report.markdown import claims_line


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def sub_runs(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.is_dir() and is_run(p))


def render(run_dir: Path) -> Path:
    """Re-render one run (or a directory of runs) and return the path of its ``report.md``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    if is_run(run_dir):
        experiment = read_json(run_dir / CONFIG).get("experiment")
        module_name = experiment.replace("-", "_") if isinstance(experiment, str) else ""
        if not module_name.isidentifier():
            raise RunDirError(f"{run_dir / CONFIG} names no known experiment ({experiment!r})")
        try:
            module = importlib.import_module(f"guided_descent.report.{module_name}")
        except ModuleNotFoundError:
            raise RunDirError(f"no report renderer for experiment {experiment!r}") from None
        if not (run_dir / SUMMARY).is_file():
            raise RunDirError(
                f"{run_dir} has no {SUMMARY}: the run did not finish, nothing to report yet"
            )
        return module.render(run_dir)
    runs = sub_runs(run_dir)
    if not runs:
        raise RunDirError(f"{run_dir} holds no run (no {CONFIG} in it or its sub-directories)")
    return render_index(run_dir, [render(r) for r in runs])


def render_index(run_dir: Path, reports: list[Path]) -> Path:
    """Join sub-run reports into one ``report.md``; image links are re-rooted to stay valid."""
    parts = [f"# guided-descent run: {run_dir.name}\n"]
    for report in reports:
        sub = report.parent
        summary = read_json(sub / SUMMARY)
        parts.append(f"- [{sub.name}]({sub.name}/{REPORT}): {claims_line(summary['claims'])}")
    parts.append("")
    for report in reports:
        sub = report.parent.name
        text = report.read_text()
        text = text.replace("](./", f"]({sub}/")
        # Demote headings one level so each sub-report sits under the index title.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        parts.append(text)
        parts.append("")
    path = run_dir / REPORT
    write_atomic(path, "\n".join(parts))
    return path
