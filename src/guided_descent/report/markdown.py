"""Markdown pieces shared by every report: tables, the claims table, number formatting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from guided_descent.experiments.records import (
    FAIL,
    PASS,
    UNDECIDED,
    VERDICTS,
    claim_reason,
    claim_verdict,
)


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant digits, ``-`` for missing, ``inf`` spelled."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(c, digits).replace("|", "\\|") for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, header has {len(headers)}: {row!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _threshold(claim: Mapping[str, Any]) -> str:
    t = claim["threshold"]
    if claim["op"] == "within":
        return f"within [{fmt(t[0])}, {fmt(t[1])}]"
    return f"{claim['op']} {fmt(t)}"


def verdict_cell(claim: Mapping[str, Any]) -> str:
    """``**PASS**``, ``**FAIL**`` or ``**UNDECIDED**`` (old files: read from ``passed``)."""
    return f"**{claim_verdict(claim)}**"


def claims_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """The claims of ``summary.json`` as a table: verdict, name, statement, value, threshold and
    the reason for the verdict (empty for files written before verdicts had reasons)."""
    rows = [
        (
            verdict_cell(c),
            c["name"],
            c["statement"],
            fmt(c["value"], 4),
            _threshold(c),
            claim_reason(c) or "-",
        )
        for c in claims
    ]
    return table(("verdict", "claim", "statement", "value", "threshold", "why"), rows)


def claims_line(claims: Sequence[Mapping[str, Any]]) -> str:
    """``3 of 5 claims pass, 1 fails, 1 undecided.``"""
    counts = {v: 0 for v in VERDICTS}
    for c in claims:
        counts[claim_verdict(c)] += 1
    text = f"{counts[PASS]} of {len(claims)} claims pass"
    if counts[FAIL]:
        text += f", {counts[FAIL]} fail{'s' if counts[FAIL] == 1 else ''}"
    if counts[UNDECIDED]:
        text += f", {counts[UNDECIDED]} undecided"
    return text + "."


def environment_line(env: Mapping[str, Any]) -> str:
    """One line naming device, versions and commit, for the top of a report."""
    device = env.get("device_name") or env.get("device", "?")
    commit = env.get("git_commit") or "unknown commit"
    return (
        f"Device: {device} ({env.get('machine', '?')}, {env.get('torch_threads', '?')} torch "
        f"threads); torch {env.get('torch', '?')}; guided-descent {env.get('guided_descent', '?')}"
        f" ({commit}); Python {env.get('python', '?')}; run at {env.get('created', '?')}."
        + (f" Command: `{env['command']}`." if env.get("command") else "")
    )


def config_block(config: Mapping[str, Any]) -> str:
    """The configuration as a compact fenced block."""
    body = "\n".join(f"{k} = {v}" for k, v in config.items())
    return f"```\n{body}\n```"
