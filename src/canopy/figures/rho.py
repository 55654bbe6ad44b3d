"""Figure 7: the length–rate correlation ρ(N, r_N) by family and task, base vs fine-tuned.

The paper's first headline: fine-tuned models show a stronger positive correlation between a
rollout's length and its entropy rate. Per prompt, ρ is the correlation over its M rollouts (the
metric table's ``rho_<correlation>``); each point is the mean over the prompts of one (family,
variant, task) with a percentile bootstrap interval over prompts. One panel per family, the tasks
along the x axis, base and fine-tuned side by side, a line at ρ = 0.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy.bootstrap import BootstrapSettings, mean_intervals
from canopy.config.figures import RhoSettings
from canopy.figures.common import drawn_matrix, renderer, require_columns, warn_left_out
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, interval_marker
from canopy.figures.style import figure_style, finish_figure, new_figure
from canopy.figures.style import set_category_ticks, variant_handles

__all__ = ["RhoSettings", "plot_rho", "render_rho", "rho_summary"]

log = logging.getLogger(__name__)

_CORRELATIONS = ("pearson", "spearman", "kendall")
_SYMBOLS = {"pearson": r"\rho", "spearman": r"\rho_S", "kendall": r"\tau"}


def rho_summary(metrics: pd.DataFrame, settings: RhoSettings) -> pd.DataFrame:
    """Mean ρ over prompts per (family, variant, task) with its bootstrap interval.

    Prompts whose ρ is undefined (constant length or rate, see the metric table's ``note``) are
    left out and counted in ``n_missing``.
    """
    require_columns(metrics, ["family", "variant", "task", settings.column], "metrics")
    bootstrap = BootstrapSettings(
        resamples=settings.resamples, confidence=settings.confidence, seed=settings.seed
    )
    return mean_intervals(metrics, settings.column, ["family", "variant", "task"], bootstrap)


def plot_rho(metrics: pd.DataFrame, settings: RhoSettings) -> Figure:
    """Draw the figure from the concatenated per-prompt metric tables (family, variant, task and
    the ``rho_<correlation>`` column)."""
    metrics, variants, tasks, families = drawn_matrix(metrics, settings.tasks, "metrics")
    summary = rho_summary(metrics, settings)
    warn_left_out(log, summary, "n_missing", "an undefined correlation")
    symbol = _SYMBOLS[settings.correlation]
    with figure_style():
        figure = new_figure(settings.width, settings.figure_height(1, 1.9, 0.6))
        axes = figure.subplots(1, len(families), sharey=True, squeeze=False)[0]
        x = np.arange(len(tasks), dtype=float)
        offsets = {v: (i - (len(variants) - 1) / 2) * 0.22 for i, v in enumerate(variants)}
        for ax, family in zip(axes, families):
            ax.axhline(0.0, color=NEUTRAL_COLOR, linewidth=0.6, linestyle=":")
            for variant in variants:
                part = summary[(summary["family"] == family) & (summary["variant"] == variant)]
                part = part.set_index("task").reindex(tasks)
                mean = part["mean"].to_numpy(dtype=float)
                errors = np.vstack(
                    [mean - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - mean]
                )
                interval_marker(
                    ax,
                    x + offsets[variant],
                    mean,
                    errors,
                    vertical=True,
                    marker="o",
                    color=VARIANT_COLORS[variant],
                    gid=f"rho/{family}/{variant}",
                )
            ax.set_title(family)
            set_category_ticks(ax, x, tasks, settings.width / len(families))
        axes[0].set_ylabel(rf"mean ${symbol}(N, r_N)$ over prompts")
        return finish_figure(figure, variant_handles(variants, "marker", markersize=3.5))


render_rho = renderer(RhoSettings, plot_rho, lambda s: ["prompt_id", s.column], "the ρ column")
