"""Figure 2: mean per-step entropy by generation step, base vs fine-tuned, with an SE band.

One panel per (family, task): rows are families, columns tasks. The input is the entropy stage's
trajectory tables (position, mean_entropy, se, n_active): the mean of h_t over the rollouts still
running at step t. Late steps are averaged over few rollouts, so ``min_active`` hides positions
with too few of them, and ``max_positions`` cuts the x axis.
"""

from __future__ import annotations


import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from canopy.config.figures import TrajectorySettings
from canopy.figures.common import drawn_matrix, renderer, require_columns
from canopy.figures.style import VARIANT_COLORS, VARIANT_LABELS, figure_style
from canopy.figures.style import finish_figure, new_figure, label_grid, variant_handles

__all__ = [
    "TrajectorySettings",
    "TRAJECTORY_COLUMNS",
    "trajectory_lines",
    "plot_trajectory",
    "render_trajectory",
]

#: Trajectory-table columns the figure reads.
TRAJECTORY_COLUMNS = ["position", "mean_entropy", "se", "n_active"]


def trajectory_lines(trajectory: pd.DataFrame, settings: TrajectorySettings) -> pd.DataFrame:
    """The rows that are drawn: positions within ``max_positions`` with enough active rollouts."""
    require_columns(trajectory, ["family", "variant", "task", *TRAJECTORY_COLUMNS], "trajectory")
    keep = trajectory["n_active"] >= settings.min_active
    if settings.max_positions is not None:
        keep &= trajectory["position"] <= settings.max_positions
    return trajectory[keep].sort_values(["family", "variant", "task", "position"], kind="stable")


def plot_trajectory(trajectory: pd.DataFrame, settings: TrajectorySettings) -> Figure:
    """Draw the per-step entropy trajectories from the concatenated trajectory tables."""
    trajectory, variants, tasks, families = drawn_matrix(trajectory, settings.tasks, "trajectory")
    lines = trajectory_lines(trajectory, settings)

    height = settings.figure_height(len(families), 1.35, 0.45)
    with figure_style():
        figure = new_figure(settings.width, height)
        axes = figure.subplots(len(families), len(tasks), squeeze=False, sharex=True, sharey="row")
        for row, family in enumerate(families):
            for column, task in enumerate(tasks):
                ax = axes[row, column]
                for variant in variants:
                    part = lines[
                        (lines["family"] == family)
                        & (lines["variant"] == variant)
                        & (lines["task"] == task)
                    ]
                    if part.empty:
                        continue
                    position = part["position"].to_numpy(dtype=float)
                    mean = part["mean_entropy"].to_numpy(dtype=float)
                    half = settings.band_se * part["se"].to_numpy(dtype=float)
                    color = VARIANT_COLORS[variant]
                    ax.fill_between(
                        position,
                        mean - half,
                        mean + half,
                        color=color,
                        alpha=0.25,
                        linewidth=0,
                        gid=f"band/{family}/{variant}/{task}",
                    )
                    ax.plot(
                        position,
                        mean,
                        color=color,
                        linewidth=1.0,
                        label=VARIANT_LABELS[variant],
                        gid=f"line/{family}/{variant}/{task}",
                    )
                if settings.log_x:
                    ax.set_xscale("log")
            # Only once the whole row is drawn: fixing a limit switches off autoscaling for every
            # axis sharing it, so doing it per panel clipped the later tasks' higher curves.
            axes[row, 0].set_ylim(bottom=0.0)
        label_grid(axes, families, tasks, "step $t$ (tokens)", "mean $h_t$ (nats/token)")
        handles = variant_handles(variants, kind="line")
        band = "±1 SE" if settings.band_se == 1.0 else f"±{settings.band_se:g} SE"
        handles.append(Patch(facecolor="0.5", alpha=0.3, linewidth=0, label=band))
        return finish_figure(figure, handles)


render_trajectory = renderer(
    TrajectorySettings, plot_trajectory, TRAJECTORY_COLUMNS, "the trajectory columns"
)
