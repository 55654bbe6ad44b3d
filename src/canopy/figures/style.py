"""Shared look of the paper's figures: variant names and colours, the Matplotlib style, saving.

Every figure is drawn inside :func:`figure_style` (the rc settings of ``canopy.mplstyle``) on a
:class:`matplotlib.figure.Figure` created without pyplot, so plotting never touches global
pyplot state and works on any backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.style
import numpy as np
from matplotlib.axes import Axes
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from canopy.config.figures import COLUMN_WIDTH, FULL_WIDTH
from canopy.io import atomic_path

__all__ = [
    "VARIANT_LABELS",
    "VARIANT_COLORS",
    "NEUTRAL_COLOR",
    "COLUMN_WIDTH",
    "FULL_WIDTH",
    "STYLE_PATH",
    "figure_style",
    "new_figure",
    "finish_figure",
    "save_figure",
    "variant_handles",
    "interval_marker",
    "label_grid",
    "set_category_ticks",
]

#: How the variants are named in legends and tick labels.
VARIANT_LABELS: dict[str, str] = {"base": "Base", "finetuned": "Fine-tuned"}
#: Fixed colours (Okabe-Ito blue and vermillion: distinct for colour-blind readers and in grey).
VARIANT_COLORS: dict[str, str] = {"base": "#0072B2", "finetuned": "#D55E00"}
#: Reference lines, totals and anything that belongs to no variant.
NEUTRAL_COLOR = "#333333"

STYLE_PATH = Path(__file__).with_name("canopy.mplstyle")


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """Apply the paper's rc settings for the duration of the block (restored afterwards)."""
    with mpl.style.context(STYLE_PATH):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` x ``height`` inches with constrained layout.

    Call it inside :func:`figure_style` so that the figure picks up the paper's settings.
    """
    return Figure(figsize=(width, height), layout="constrained")


def finish_figure(figure: Figure, legend: list[Artist] | None = None) -> Figure:
    """Put ``legend`` (handles) in one row above the panels, and pin the style's tick settings
    onto every axes.

    Matplotlib creates tick labels lazily, reading rcParams when they are first drawn; a figure
    returned from inside :func:`figure_style` and shown later (say in a notebook) would otherwise
    get default-sized ticks. Storing the sizes on each axis makes it look the same wherever it is
    drawn. (:func:`save_figure` draws inside the style anyway.)
    """
    if legend:
        figure.legend(handles=legend, loc="outside upper center", ncols=len(legend))
    rc = mpl.rcParams
    for axes in figure.axes:
        for axis_name in ("x", "y"):
            axes.tick_params(
                axis=axis_name,
                which="major",
                labelsize=rc[f"{axis_name}tick.labelsize"],
                width=rc[f"{axis_name}tick.major.width"],
                length=rc[f"{axis_name}tick.major.size"],
                pad=rc[f"{axis_name}tick.major.pad"],
            )
            axes.tick_params(
                axis=axis_name, which="minor", length=rc[f"{axis_name}tick.minor.size"]
            )
    return figure


def save_figure(
    figure: Figure,
    pdf: str | os.PathLike[str] | None,
    png: str | os.PathLike[str] | None,
    dpi: int = 300,
) -> Figure:
    """Write ``figure`` as PDF and/or PNG, each atomically (temporary file, then rename), and
    return it.

    The PDF carries no creation date, so redrawing unchanged data gives an identical file.
    """
    with figure_style():
        if pdf is not None:
            with atomic_path(pdf) as tmp:
                figure.savefig(tmp, format="pdf", metadata={"CreationDate": None})
        if png is not None:
            with atomic_path(png) as tmp:
                figure.savefig(tmp, format="png", dpi=dpi)
    return figure


def variant_handles(
    variants: list[str] | tuple[str, ...], kind: str = "patch", **line: Any
) -> list[Artist]:
    """Legend handles naming each variant ("Base", "Fine-tuned") in its colour.

    ``kind`` "patch" suits bars, histograms and bands, "line" lines, "marker" scatter points;
    ``line`` are further Line2D properties of a line or marker handle (e.g. ``markersize``).
    """
    handles: list[Artist] = []
    for variant in variants:
        color, label = VARIANT_COLORS[variant], VARIANT_LABELS[variant]
        if kind == "patch":
            handles.append(Patch(facecolor=color, edgecolor=color, alpha=0.8, label=label))
        elif kind == "line":
            handles.append(Line2D([], [], color=color, label=label, **line))
        elif kind == "marker":
            handles.append(
                Line2D([], [], color=color, marker="o", linestyle="none", label=label, **line)
            )
        else:
            raise ValueError(f"kind must be 'patch', 'line' or 'marker', got {kind!r}")
    return handles


def interval_marker(
    axes: Axes,
    x: Any,
    y: Any,
    error: np.ndarray,
    *,
    vertical: bool,
    marker: str,
    color: str,
    gid: str,
) -> None:
    """An estimate with its interval (``error``: distances below and above, shape (2, n)) as a
    marker with error bars, vertical or horizontal; ``gid`` names the marker in the SVG/PDF."""
    bars = axes.errorbar(
        x,
        y,
        **{"yerr" if vertical else "xerr": error},
        fmt=marker,
        markersize=3.5,
        color=color,
        elinewidth=1.0,
        capsize=2.0,
    )
    bars.lines[0].set_gid(gid)


def label_grid(
    axes: np.ndarray,
    row_labels: list[str],
    column_labels: list[str],
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> None:
    """Facet labels of a panel grid: column names as titles of the top row, row names as
    vertical strips right of the last column (one label per row, not per panel, saves room);
    ``xlabel`` under the bottom row, ``ylabel`` left of the first column."""
    for ax in axes[-1, :] if xlabel is not None else ():
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0] if ylabel is not None else ():
        ax.set_ylabel(ylabel)
    for column, label in enumerate(column_labels):
        axes[0, column].set_title(label)
    if len(row_labels) == 1 and len(column_labels) > 1:
        # A single row needs no strip: say the row's name in the titles instead.
        for column, label in enumerate(column_labels):
            axes[0, column].set_title(f"{row_labels[0]} · {label}")
        return
    for row, label in enumerate(row_labels):
        axes[row, -1].annotate(
            label,
            xy=(1.02, 0.5),
            xycoords="axes fraction",
            rotation=270,
            ha="left",
            va="center",
            fontweight="bold",
            fontsize=mpl.rcParams["axes.titlesize"],
        )


def set_category_ticks(axes: Axes, positions: np.ndarray, labels: list[str], width: float) -> None:
    """Category tick labels that stay readable: slanted when they would not fit side by side.

    ``width`` is the panel's width in inches; a label needs roughly 0.6 em per character.
    """
    size_in = mpl.rcParams["xtick.labelsize"]
    if isinstance(size_in, str):  # "small" etc.: fall back to the default font size
        size_in = mpl.rcParams["font.size"]
    char_width = 0.6 * float(size_in) / 72.0
    needed = sum(len(label) * char_width + 0.08 for label in labels)
    axes.set_xticks(positions, labels)
    if needed > 0.7 * width:  # the axes get about 70 % of a panel: the rest is labels
        axes.tick_params(axis="x", labelrotation=30)
        for text in axes.get_xticklabels():
            text.set_horizontalalignment("right")
            text.set_rotation_mode("anchor")
