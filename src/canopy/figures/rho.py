"""Figure 7: the length–rate correlation ρ(N, r_N) by family and task, base vs fine-tuned.

The paper's first headline: fine-tuned models show a stronger positive correlation between a
rollout's length and its entropy rate. Per prompt, ρ is the correlation over its M rollouts (the
metric table's ``rho_<correlation>``); each point is the mean over the prompts of one (family,
variant, task) with a percentile bootstrap interval over prompts. One panel per family, the tasks
along the x axis, base and fine-tuned side by side, a line at ρ = 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canopy.bootstrap import BootstrapSettings, mean_intervals
from canopy.config.figures import RhoSettings
from canopy.figures.common import (
    TableKey,
    check_variants,
    ordered_families,
    ordered_tasks,
    read_matrix_tables,
    require_columns,
)
from canopy.figures.style import (
    NEUTRAL_COLOR,
    VARIANT_COLORS,
    VARIANT_LABELS,
    figure_style,
    finish_figure,
    new_figure,
    save_figure,
    set_category_ticks,
)

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
    require_columns(metrics, ["family", "variant", "task"], "metrics")
    variants = check_variants(metrics, "metrics")
    tasks = ordered_tasks(metrics, settings.tasks, "metrics")
    families = ordered_families(metrics)
    summary = rho_summary(metrics[metrics["task"].isin(tasks)], settings)
    for row in summary.itertuples():
        if row.n_missing:
            log.warning(
                "%s/%s/%s: %d prompt(s) with an undefined correlation left out",
                row.family,
                row.variant,
                row.task,
                row.n_missing,
            )
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
                bars = ax.errorbar(
                    x + offsets[variant],
                    mean,
                    yerr=errors,
                    fmt="o",
                    markersize=3.5,
                    color=VARIANT_COLORS[variant],
                    elinewidth=1.0,
                    capsize=2.0,
                )
                bars.lines[0].set_gid(f"rho/{family}/{variant}")
            ax.set_title(family)
            set_category_ticks(ax, x, tasks, settings.width / len(families))
        axes[0].set_ylabel(rf"mean ${symbol}(N, r_N)$ over prompts")
        handles = [
            Line2D(
                [],
                [],
                marker="o",
                markersize=3.5,
                color=VARIANT_COLORS[v],
                linestyle="none",
                label=VARIANT_LABELS[v],
            )
            for v in variants
        ]
        figure.legend(handles=handles, loc="outside upper center", ncols=len(handles))
        return finish_figure(figure)


def render_rho(
    metric_paths: Mapping[TableKey, str | os.PathLike[str]],
    settings: Mapping[str, Any] | RhoSettings,
    pdf: str | os.PathLike[str],
    png: str | os.PathLike[str],
) -> Figure:
    """Read the metric tables, draw the figure and write it as PDF and PNG."""
    if not isinstance(settings, RhoSettings):
        settings = RhoSettings.from_config(settings)
    metrics = read_matrix_tables(metric_paths, columns=["prompt_id", settings.column])
    figure = plot_rho(metrics, settings)
    save_figure(figure, pdf, png, dpi=settings.dpi)
    return figure
