"""Figure 8: the ablation forest plot, one row per sweep point (sampling setting x embedder).

Left: the Beta GLMM's entropy-rate slope ratio fine-tuned / base with its interval (a dotted
line at 1: no change). Right: the difference of the mean ρ(N, r_N) fine-tuned − base with its
paired prompt-bootstrap interval (a dotted line at 0). Both read the ablation table of
:func:`canopy.report.ablation_table`; the main setting (the first row) is drawn in black.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy.config.figures import ForestSettings
from canopy.figures.common import read_table, require_columns
from canopy.figures.common import Config, FilePath, settings_for
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, figure_style
from canopy.figures.style import finish_figure, interval_marker, new_figure, save_figure

__all__ = ["ForestSettings", "forest_rows", "plot_forest", "render_forest"]

_INTERVALS = {
    "delta": ("slope_ratio_ci_low", "slope_ratio_ci_high"),
    "bootstrap": ("slope_ratio_boot_ci_low", "slope_ratio_boot_ci_high"),
}


def forest_rows(table: pd.DataFrame) -> list[str]:
    """Row labels, top to bottom: ``sampling / embedder`` in table order."""
    require_columns(table, ["sampling", "embedder"], "ablation")
    return [f"{s} / {e}" for s, e in zip(table["sampling"], table["embedder"])]


def plot_forest(table: pd.DataFrame, settings: ForestSettings) -> Figure:
    """Draw the forest plot from the ablation table (one row per sweep point)."""
    low, high = _INTERVALS[settings.interval]
    require_columns(
        table,
        [
            "slope_ratio",
            low,
            high,
            "rho_difference",
            "rho_difference_ci_low",
            "rho_difference_ci_high",
        ],
        "ablation",
    )
    if table.empty:
        raise ValueError("the ablation table has no rows: no sweep point to draw")
    labels = forest_rows(table)
    y = np.arange(len(labels))[::-1].astype(float)
    colors = [NEUTRAL_COLOR] + [VARIANT_COLORS["finetuned"]] * (len(labels) - 1)
    panels = [
        ("slope_ratio", low, high, 1.0, "entropy-rate slope ratio\n(fine-tuned / base)"),
        (
            "rho_difference",
            "rho_difference_ci_low",
            "rho_difference_ci_high",
            0.0,
            r"$\Delta$ mean $\rho(N, r_N)$" + "\n(fine-tuned − base)",
        ),
    ]
    with figure_style():
        figure = new_figure(settings.width, settings.figure_height(len(labels), 0.28, 0.9))
        axes = figure.subplots(1, 2, sharey=True)
        for ax, (column, lo, hi, reference, title) in zip(axes, panels):
            ax.axvline(reference, color=NEUTRAL_COLOR, linewidth=0.6, linestyle=":")
            estimate = table[column].to_numpy(dtype=float)
            errors = np.vstack(
                [estimate - table[lo].to_numpy(float), table[hi].to_numpy(float) - estimate]
            )
            for row in range(len(labels)):
                interval_marker(
                    ax,
                    estimate[row],
                    y[row],
                    errors[:, row : row + 1],
                    vertical=False,
                    marker="s",
                    color=colors[row],
                    gid=f"{column}/{labels[row]}",
                )
            ax.set_xlabel(title)
        axes[0].set_yticks(y, labels)
        return finish_figure(figure)


def render_forest(
    table_path: FilePath, settings: Config | ForestSettings, pdf: FilePath, png: FilePath
) -> Figure:
    """Read the ablation table, draw the forest plot and write it as PDF and PNG."""
    settings = settings_for(ForestSettings, settings)
    return save_figure(plot_forest(read_table(table_path), settings), pdf, png, dpi=settings.dpi)
