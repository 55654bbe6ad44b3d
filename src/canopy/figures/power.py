"""Figure 9: the power planner's table (``stats/<sampling>/<embedder>/power.tsv``).

Left: the median width of the slope ratio's confidence interval against the prompts per (family,
task, variant) of a simulated panel (log axes: the width falls about as one over the root of the
prompts). Right: the share of intervals that exclude 1 at the fitted and at the hypothesised
ratio, with the ``target`` power as a dotted line. Error bars: ± one Monte-Carlo SE.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy.config.figures import PowerSettings
from canopy.figures.common import read_table, require_columns
from canopy.figures.common import Config, FilePath, settings_for
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, figure_style
from canopy.figures.style import finish_figure, interval_marker, new_figure, save_figure

__all__ = ["POWER_COLUMNS", "PowerSettings", "plot_power", "render_power"]

#: Columns of ``power.tsv`` the figure reads.
POWER_COLUMNS = [
    "prompts",
    "effect",
    "true_ratio",
    "median_ci_width",
    "median_ci_width_se",
    "share_excluding_1",
    "share_excluding_1_se",
]
#: The fitted effect in the neutral colour, the hypothesised one in the fine-tuned colour.
_COLORS = {"fitted": NEUTRAL_COLOR, "hypothesised": VARIANT_COLORS["finetuned"]}


def plot_power(table: pd.DataFrame, settings: PowerSettings) -> Figure:
    """Draw CI width and power against prompts, one line per effect of the table."""
    require_columns(table, POWER_COLUMNS, "power")
    unknown = sorted(set(table["effect"].astype(str)) - set(_COLORS))
    if unknown:
        raise ValueError(f"the power table has unexpected effect(s) {', '.join(unknown)}")
    if table.empty:
        raise ValueError("the power table has no rows")
    with figure_style():
        figure = new_figure(settings.width, settings.figure_height(1, 2.2, 0.5))
        ax_width, ax_power = figure.subplots(1, 2)
        handles = []
        for effect, color in _COLORS.items():
            rows = table[table["effect"] == effect].sort_values("prompts")
            if rows.empty:
                continue
            x = rows["prompts"].to_numpy(float)
            label = f"{effect} (ratio {rows['true_ratio'].iloc[0]:.2f})"
            for ax, column in ((ax_width, "median_ci_width"), (ax_power, "share_excluding_1")):
                y = rows[column].to_numpy(float)
                se = rows[f"{column}_se"].to_numpy(float)
                (line,) = ax.plot(x, y, color=color, linewidth=0.8, label=label)
                interval_marker(
                    ax,
                    x,
                    y,
                    np.vstack([se, se]),
                    vertical=True,
                    marker="o",
                    color=color,
                    gid=f"{column}/{effect}",
                )
            handles.append(line)
        for ax in (ax_width, ax_power):
            ax.set_xscale("log", base=2)
            prompts = np.sort(table["prompts"].unique())
            ax.set_xticks(prompts, [str(p) for p in prompts])
            ax.minorticks_off()
            ax.set_xlabel("prompts per (family, task, variant)")
        ax_width.set_yscale("log")
        ax_width.set_ylabel("median 95% CI width of the slope ratio")
        ax_power.axhline(settings.target, color="0.5", linestyle=":", linewidth=0.8)
        ax_power.set_ylim(-0.02, 1.02)
        ax_power.set_ylabel("share of CIs excluding 1")
        return finish_figure(figure, legend=handles)


def render_power(
    table_path: FilePath, settings: Config | PowerSettings, pdf: FilePath, png: FilePath
) -> Figure:
    """Read ``power.tsv``, draw it and write PDF and PNG."""
    settings = settings_for(PowerSettings, settings)
    return save_figure(plot_power(read_table(table_path), settings), pdf, png, dpi=settings.dpi)
