"""Figures: one helper does the setup every plot shares (axes, grid, legend, name, PNG rendering).

A saturated point is drawn hollow (its latency measures queue growth), a stable one filled, one of
unknown stability (an older run) with a cross.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loadtest.report.data import GENERATOR_LIMITED, SATURATED, STABLE, PointData

MAX_FIGURES_PER_SECTION = 24
DPI = 90


@dataclass
class Figure:
    """A rendered plot: PNG bytes and a caption; ``name`` is its file name under plots/ (no suffix)."""

    name: str
    caption: str
    png: bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def slug(*parts: str) -> str:
    """A file-name-safe name from ``parts``."""
    text = "_".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:120]


@contextmanager
def plot(
    out: list[Figure],
    name: tuple[str, ...],
    caption: str,
    *,
    figsize: tuple[float, float] = (7, 4.2),
    ncols: int = 1,
    grid_axis: str = "both",
    legend_loc: str | None = "best",
) -> Iterator[list]:
    """Yield the axes of a new figure; on exit add grid and legend, render it and append it to ``out``.

    ``legend_loc``: a matplotlib location, ``"outside"`` (right of the axes) or None (no legend).

    Appends nothing once ``out`` holds :data:`MAX_FIGURES_PER_SECTION` figures (the body still runs).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        yield list(axes[0])
        for ax in axes[0]:
            ax.grid(alpha=0.3, axis=grid_axis)
            if legend_loc == "outside" and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            elif legend_loc and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc=legend_loc)
        if len(out) < MAX_FIGURES_PER_SECTION:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
            out.append(Figure(slug(*name), caption, buffer.getvalue()))
    finally:
        plt.close(fig)


def marker_style(point: PointData, color) -> dict:
    """Marker keywords by stability: filled (stable), hollow (saturated), hollow square (the load
    generator was late or busy), cross (unknown)."""
    if point.stability == STABLE:
        return {"marker": "o", "color": color}
    if point.stability == SATURATED:
        return {"marker": "o", "markerfacecolor": "none", "markeredgecolor": color, "color": color}
    if point.stability == GENERATOR_LIMITED:
        return {"marker": "s", "markerfacecolor": "none", "markeredgecolor": color, "color": color}
    return {"marker": "x", "color": color}


def stability_legend(ax) -> None:
    """Add the marker key (see :func:`marker_style`) to the axis' legend."""
    for style, text in (
        ({"marker": "o", "color": "grey"}, "stable"),
        ({"marker": "o", "markerfacecolor": "none", "markeredgecolor": "grey", "color": "grey"}, SATURATED),
        (
            {"marker": "s", "markerfacecolor": "none", "markeredgecolor": "grey", "color": "grey"},
            "load generator off schedule",
        ),
        ({"marker": "x", "color": "grey"}, "stability unknown"),
    ):
        ax.plot([], [], linestyle="none", label=text, **style)
