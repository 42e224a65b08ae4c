"""Reading a ``linear-representation`` summary: its cells, methods and step counts, for the
report's tables, figures and discussion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from guided_descent.experiments.linear_representation import LABELS

Entry = Mapping[str, Any]


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _key(kx: float, kf: float) -> str:
    return f"{kx:g},{kf:g}"


def _k(x: float) -> str:
    return f"{x:g}"


def _cells(res: Mapping[str, Any]) -> list[tuple[float, float]]:
    return [(c["kappa_x"], c["kappa_f"]) for c in res["cells"]]


def _kappas(res: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    cells = _cells(res)
    return sorted({kx for kx, _ in cells}), sorted({kf for _, kf in cells})


def _cell(res: Mapping[str, Any], method: str, kx: float, kf: float) -> Entry | None:
    m = res["methods"].get(method)
    return None if m is None else m["cells"].get(_key(kx, kf))


def _hyper(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _fmt_steps(x: float | None, budget: int) -> str:
    if x is None:
        return "-"
    return f">{budget}" if x > budget else f"{x:.0f}"


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None
