"""Learning curves of a run as one PNG (matplotlib's Agg canvas, no pyplot global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from bilevel_ray.files import atomic_write

__all__ = ["plot_curves"]


def plot_curves(rows: Sequence[Mapping[str, float]], path: str | Path, title: str,
                metrics: Iterable[str] | None = None) -> None:
    """One subplot per metric against ``step``; log y-scale when every value is > 0 and they span over
    two decades. ``metrics`` defaults to every key but ``step``. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k in (metrics if metrics is not None else rows[0]) if k != "step"]
    ncols = min(3, max(len(names), 1))
    nrows = max(math.ceil(len(names) / ncols), 1)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    steps = [row["step"] for row in rows]
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = [_as_float(row.get(name)) for row in rows]
        ax.plot(steps, values, marker="." if len(rows) < 50 else None)
        finite = [v for v in values if math.isfinite(v)]
        if finite and len(finite) == len(values) and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig: object, path: str | Path) -> None:
    """Write a matplotlib figure as PNG, atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
