"""Figure 3: sequence-length distributions (N, EOS step included), base vs fine-tuned.

One panel per (family, task). Each variant's lengths are drawn as a histogram of the share of
its rollouts per bin over bins shared by both variants, so the two outlines compare directly.
A dashed line marks the ``max_new_tokens`` cap: rollouts piled up there were truncated (no EOS),
which biases CE* downwards, so a reader must see how many there are.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canopy.config.figures import LengthsSettings
from canopy.figures.common import drawn_matrix, renderer
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, VARIANT_LABELS
from canopy.figures.style import figure_style, finish_figure, new_figure, label_grid
from canopy.figures.style import variant_handles

__all__ = [
    "LengthsSettings",
    "LENGTH_COLUMNS",
    "length_bins",
    "infer_length_cap",
    "plot_lengths",
    "render_lengths",
]

#: Rollout-table columns the figure reads (the rest of a rollout table can be large).
LENGTH_COLUMNS = ["prompt_id", "n_steps", "hit_eos"]


def infer_length_cap(rollouts: pd.DataFrame) -> int | None:
    """The ``max_new_tokens`` cap as seen in the data: the longest rollout that hit no EOS.

    None when every rollout ended on EOS (the cap is then not visible in the data).
    """
    truncated = rollouts.loc[~rollouts["hit_eos"].astype(bool), "n_steps"]
    return int(truncated.max()) if len(truncated) else None


def length_bins(lengths: np.ndarray, bins: int, log_scale: bool) -> np.ndarray:
    """Bin edges shared by both variants of a panel: linear, or log-spaced for ``log_scale``."""
    lengths = np.asarray(lengths, dtype=float)
    low, high = float(lengths.min()), float(lengths.max())
    if log_scale:
        low = max(low, 1.0)
        if high <= low:
            high = low * 1.5
        return np.geomspace(low, high * 1.0001, bins + 1)
    # Edges at half-integers keep every integer length inside one bin; with fewer distinct
    # lengths than bins, one bin per length avoids a comb of empty bins.
    if high - low + 1 <= bins:
        return np.arange(low - 0.5, high + 1.0, 1.0)
    return np.linspace(low - 0.5, high + 0.5, bins + 1)


def plot_lengths(
    rollouts: pd.DataFrame, settings: LengthsSettings, max_new_tokens: int | None = None
) -> Figure:
    """Draw the length histograms from the concatenated rollout tables.

    ``max_new_tokens`` marks the sampling cap; None infers it from truncated rollouts (the
    longest rollout without EOS) and draws no line when there are none.
    """
    rollouts, variants, tasks, families = drawn_matrix(
        rollouts, settings.tasks, "rollouts", ["n_steps", "hit_eos"]
    )
    if (rollouts["n_steps"] < 1).any():
        bad = rollouts.loc[rollouts["n_steps"] < 1].iloc[0]
        raise ValueError(
            f"{bad['family']}/{bad['variant']}/{bad['task']}: a rollout with n_steps "
            f"{bad['n_steps']} < 1 (N counts the EOS step, so every rollout has at least one)"
        )
    cap = max_new_tokens if max_new_tokens is not None else infer_length_cap(rollouts)

    height = settings.figure_height(len(families), 1.3, 0.45)
    with figure_style():
        figure = new_figure(settings.width, height)
        axes = figure.subplots(len(families), len(tasks), squeeze=False)
        for row, family in enumerate(families):
            for column, task in enumerate(tasks):
                ax = axes[row, column]
                panel = rollouts[(rollouts["family"] == family) & (rollouts["task"] == task)]
                lengths = panel["n_steps"].to_numpy(dtype=float)
                if lengths.size:
                    edges = length_bins(
                        np.append(lengths, cap) if cap is not None else lengths,
                        settings.bins,
                        settings.log_scale,
                    )
                    for variant in variants:
                        values = panel.loc[panel["variant"] == variant, "n_steps"]
                        values = values.to_numpy(dtype=float)
                        if values.size == 0:
                            continue
                        weights = np.full(values.size, 1.0 / values.size)
                        color = VARIANT_COLORS[variant]
                        ax.hist(
                            values,
                            bins=edges,
                            weights=weights,
                            histtype="stepfilled",
                            color=color,
                            alpha=0.25,
                            linewidth=0,
                        )
                        ax.hist(
                            values,
                            bins=edges,
                            weights=weights,
                            histtype="step",
                            color=color,
                            linewidth=1.0,
                            label=VARIANT_LABELS[variant],
                            gid=f"hist/{family}/{variant}/{task}",
                        )
                if cap is not None:
                    ax.axvline(cap, color=NEUTRAL_COLOR, linestyle="--", linewidth=0.8, gid="cap")
                if settings.log_scale:
                    ax.set_xscale("log")
        label_grid(axes, families, tasks, "length $N$ (tokens)", "share of rollouts")
        handles = variant_handles(variants, kind="patch")
        if cap is not None:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=NEUTRAL_COLOR,
                    linestyle="--",
                    linewidth=0.8,
                    label=f"max_new_tokens = {cap}",
                )
            )
        return finish_figure(figure, handles)


render_lengths = renderer(LengthsSettings, plot_lengths, LENGTH_COLUMNS, "the rollout lengths")
