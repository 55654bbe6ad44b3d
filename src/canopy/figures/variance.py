"""Figure 4: how much rollouts of one prompt vary, base vs fine-tuned.

For every prompt the within-prompt sample variance (ddof 1) over its M rollouts is computed for
the summed entropy H_i, the length N_i and the entropy rate r_i = H_i / N_i. The figure shows the
distribution of those variances across prompts: rows are families, columns the three
quantities, and each task is a pair of box plots (Base, Fine-tuned) on a log axis by default.
A variance of exactly zero (e.g. every rollout truncated at the same length) has no place on a
log axis; such prompts are counted in the panel instead of silently vanishing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation

from canopy.config.figures import VarianceSettings
from canopy.figures.common import drawn_matrix, renderer, require_columns
from canopy.figures.style import VARIANT_COLORS, figure_style, finish_figure, new_figure
from canopy.figures.style import label_grid, set_category_ticks, variant_handles

__all__ = [
    "VarianceSettings",
    "VARIANCE_COLUMNS",
    "VARIANCE_QUANTITIES",
    "within_prompt_variances",
    "plot_variance",
    "render_variance",
]

log = logging.getLogger(__name__)

#: Rollout-table columns the figure reads.
VARIANCE_COLUMNS = ["prompt_id", "n_steps", "sum_entropy"]

#: column of :func:`within_prompt_variances` -> (panel title, axis label with units).
VARIANCE_QUANTITIES: dict[str, tuple[str, str]] = {
    "var_entropy": ("summed entropy $H_i$", r"Var$(H_i)$ (nats$^2$)"),
    "var_length": ("length $N_i$", r"Var$(N_i)$ (tokens$^2$)"),
    "var_rate": ("entropy rate $r_i$", r"Var$(r_i)$ ((nats/token)$^2$)"),
}

_BOX_WIDTH = 0.36


def within_prompt_variances(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per (family, variant, task, prompt): the sample variances (ddof 1) of H_i, N_i and r_i.

    Returns columns family, variant, task, prompt_id, n_rollouts, var_entropy, var_length,
    var_rate; a prompt with a single rollout gets NaN variances.
    """
    keys = ["family", "variant", "task", "prompt_id"]
    require_columns(rollouts, [*keys, "n_steps", "sum_entropy"], "rollouts")
    if (rollouts["n_steps"] < 1).any():
        bad = rollouts.loc[rollouts["n_steps"] < 1].iloc[0]
        raise ValueError(
            f"{bad['family']}/{bad['variant']}/{bad['task']} prompt {bad['prompt_id']}: a rollout "
            f"with n_steps {bad['n_steps']} < 1 has no entropy rate (N counts the EOS step)"
        )
    frame = rollouts[keys].copy()
    frame["H"] = rollouts["sum_entropy"].astype(float)
    frame["N"] = rollouts["n_steps"].astype(float)
    frame["r"] = frame["H"] / frame["N"]
    grouped = frame.groupby(keys, sort=False)
    result = grouped[["H", "N", "r"]].var(ddof=1)
    result.columns = ["var_entropy", "var_length", "var_rate"]
    result.insert(0, "n_rollouts", grouped.size())
    return result.reset_index()


def plot_variance(rollouts: pd.DataFrame, settings: VarianceSettings) -> Figure:
    """Draw the distributions of within-prompt variances from the concatenated rollout tables."""
    rollouts, variants, tasks, families = drawn_matrix(rollouts, settings.tasks, "rollouts")
    variances = within_prompt_variances(rollouts)

    height = settings.figure_height(len(families), 1.45, 0.45)
    step = _BOX_WIDTH + 0.04
    offsets = {v: (i - (len(variants) - 1) / 2) * step for i, v in enumerate(variants)}
    x = np.arange(len(tasks), dtype=float)
    with figure_style():
        figure = new_figure(settings.width, height)
        axes = figure.subplots(len(families), len(VARIANCE_QUANTITIES), squeeze=False)
        for row, family in enumerate(families):
            for column, (quantity, (title, label)) in enumerate(VARIANCE_QUANTITIES.items()):
                ax = axes[row, column]
                n_zero = 0
                for variant in variants:
                    color = VARIANT_COLORS[variant]
                    for position, task in zip(x + offsets[variant], tasks):
                        values = variances.loc[
                            (variances["family"] == family)
                            & (variances["variant"] == variant)
                            & (variances["task"] == task),
                            quantity,
                        ].to_numpy(dtype=float)
                        values = values[np.isfinite(values)]
                        if settings.log_scale:
                            n_zero += int((values <= 0).sum())
                            values = values[values > 0]
                        if values.size == 0:
                            continue
                        ax.boxplot(
                            values,
                            positions=[position],
                            widths=_BOX_WIDTH,
                            patch_artist=True,
                            showfliers=settings.show_outliers,
                            manage_ticks=False,
                            boxprops={
                                "facecolor": color,
                                "edgecolor": color,
                                "alpha": 0.45,
                                "linewidth": 0.6,
                            },
                            medianprops={
                                "color": color,
                                "linewidth": 1.2,
                                "gid": f"median/{family}/{variant}/{task}/{quantity}",
                            },
                            whiskerprops={"color": color, "linewidth": 0.6},
                            capprops={"color": color, "linewidth": 0.6},
                            flierprops={
                                "marker": "o",
                                "markersize": 1.5,
                                "markeredgecolor": color,
                                "markerfacecolor": color,
                                "alpha": 0.5,
                            },
                        )
                if n_zero:
                    log.warning(
                        "%s, %s: %d prompt(s) with zero variance not on the log axis",
                        family,
                        quantity,
                        n_zero,
                    )
                    ax.text(
                        0.98,
                        0.97,
                        f"{n_zero} zero",
                        transform=ax.transAxes,
                        ha="right",
                        va="top",
                        fontsize=6,
                        color="0.35",
                    )
                if settings.log_scale:
                    ax.set_yscale("log")
                    ax.yaxis.set_minor_formatter(_SparseLogFormatter())
                set_category_ticks(ax, x, tasks, settings.width / len(VARIANCE_QUANTITIES))
                ax.set_xlim(-0.6, len(tasks) - 0.4)
                ax.set_ylabel(label)
        label_grid(axes, families, [title for title, _ in VARIANCE_QUANTITIES.values()])
        return finish_figure(figure, variant_handles(variants, kind="patch"))


class _SparseLogFormatter(LogFormatterSciNotation):
    """Minor-tick labels of a log axis that do not crowd a short panel.

    Matplotlib labels 2, 3, 4, 6 x 10^k while the view spans under about two decades, which at
    this panel height stacks the labels on each other. With two powers of ten in view they say
    enough; with fewer, 2 and 5 x 10^k give the scale without the crowding.
    """

    def __init__(self) -> None:
        super().__init__(labelOnlyBase=False)

    def set_locs(self, locs: Any = None) -> None:
        low, high = self.axis.get_view_interval()
        decades_in_view = np.floor(np.log10(high)) - np.ceil(np.log10(low)) + 1
        self._sublabels = {1} if decades_in_view >= 2 else {1, 2, 5}


render_variance = renderer(
    VarianceSettings, plot_variance, VARIANCE_COLUMNS, "the needed rollout columns"
)
