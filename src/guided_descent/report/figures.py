"""Matplotlib plumbing shared by the reports: a headless backend and atomic PNG writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from guided_descent.experiments.records import write_atomic


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_atomic(Path(path), buf.getvalue())
    return Path(path)
