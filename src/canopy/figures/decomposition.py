"""Figure 1: Canopy Entropy decomposed, CE* = E[N]·E[r] + Cov(N, r), base vs fine-tuned.

Per prompt the estimator satisfies mean_i H_i = mean(N)·mean(r) + Cov(N, r) exactly, so the means
over prompts of the two terms add up to the mean CE* drawn as the total. Each family is a panel,
each task a pair of bars (Base, Fine-tuned): the solid part is the product term, the hatched part
the covariance term stacked on top of it (drawn downwards when negative), the black point the
total with its standard error. An optional second row shows the covariance term on its own scale,
since it is often small next to the product.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from canopy.config.figures import DecompositionSettings
from canopy.figures.common import drawn_matrix, renderer, require_columns, standard_error
from canopy.figures.common import warn_left_out
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, VARIANT_LABELS
from canopy.figures.style import figure_style, finish_figure, new_figure
from canopy.figures.style import set_category_ticks

__all__ = [
    "DecompositionSettings",
    "DECOMPOSITION_COLUMNS",
    "decomposition_summary",
    "plot_decomposition",
    "render_decomposition",
]

log = logging.getLogger(__name__)

#: Metric-table columns the figure reads.
DECOMPOSITION_COLUMNS = [
    "prompt_id",
    "canopy_entropy",
    "canopy_entropy_se",
    "decomposition_product",
    "cov_length_rate",
]

_BAR_WIDTH = 0.38


def decomposition_summary(metrics: pd.DataFrame, error_bars: str = "prompts") -> pd.DataFrame:
    """Mean product term, covariance term and CE* over prompts per (family, variant, task).

    Prompts whose CE* or either term is not finite (see the metric table's ``note``) are left out
    of all three means, so that the drawn terms still add up to the drawn total.
    Returns columns family, variant, task, n_prompts, n_dropped, product, covariance, total,
    total_se, covariance_se.
    """
    require_columns(metrics, ["family", "variant", "task", *DECOMPOSITION_COLUMNS[1:]], "metrics")
    if error_bars not in ("prompts", "rollouts"):
        raise ValueError(f"error_bars must be 'prompts' or 'rollouts', got {error_bars!r}")
    rows = []
    for (family, variant, task), group in metrics.groupby(
        ["family", "variant", "task"], sort=False
    ):
        values = group[["decomposition_product", "cov_length_rate", "canopy_entropy"]]
        usable = np.isfinite(values.to_numpy(dtype=float)).all(axis=1)
        kept = group[usable]
        n = len(kept)
        if error_bars == "prompts":
            total_se = standard_error(kept["canopy_entropy"])
        else:
            se = kept["canopy_entropy_se"].to_numpy(dtype=float)
            total_se = float(np.sqrt(np.nansum(se**2)) / n) if n else float("nan")
        rows.append(
            {
                "family": family,
                "variant": variant,
                "task": task,
                "n_prompts": n,
                "n_dropped": int((~usable).sum()),
                "product": float(kept["decomposition_product"].mean()) if n else float("nan"),
                "covariance": float(kept["cov_length_rate"].mean()) if n else float("nan"),
                "total": float(kept["canopy_entropy"].mean()) if n else float("nan"),
                "total_se": total_se,
                "covariance_se": standard_error(kept["cov_length_rate"]),
            }
        )
    return pd.DataFrame(rows)


def plot_decomposition(metrics: pd.DataFrame, settings: DecompositionSettings) -> Figure:
    """Draw the decomposition from the concatenated per-prompt metric tables.

    ``metrics`` holds one row per (family, variant, task, prompt) with the columns of
    :data:`DECOMPOSITION_COLUMNS` plus family, variant and task.
    """
    metrics, variants, tasks, families = drawn_matrix(metrics, settings.tasks, "metrics")
    summary = decomposition_summary(metrics, settings.error_bars)
    warn_left_out(log, summary, "n_dropped", "a non-finite CE* or term")

    n_rows = 2 if settings.show_covariance_panel else 1
    height = settings.figure_height(n_rows, 1.45, 0.55)
    with figure_style():
        figure = new_figure(settings.width, height)
        ratios = [2.2, 1.0] if n_rows == 2 else [1.0]
        grid = figure.add_gridspec(n_rows, len(families), height_ratios=ratios)
        x = np.arange(len(tasks), dtype=float)
        offsets = _offsets(variants)
        for column, family in enumerate(families):
            top = figure.add_subplot(grid[0, column])
            bottom = figure.add_subplot(grid[1, column], sharex=top) if n_rows == 2 else None
            for variant in variants:
                part = summary[(summary["family"] == family) & (summary["variant"] == variant)]
                part = part.set_index("task").reindex(tasks)
                xs = x + offsets[variant]
                color = VARIANT_COLORS[variant]
                product = part["product"].to_numpy(dtype=float)
                covariance = part["covariance"].to_numpy(dtype=float)
                top.bar(
                    xs,
                    product,
                    _BAR_WIDTH,
                    color=color,
                    edgecolor=color,
                    gid=f"product/{family}/{variant}",
                )
                top.bar(
                    xs,
                    covariance,
                    _BAR_WIDTH,
                    bottom=product,
                    color="white",
                    alpha=0.9,
                    edgecolor=color,
                    hatch="/////",
                    gid=f"covariance/{family}/{variant}",
                )
                totals = top.errorbar(
                    xs,
                    part["total"].to_numpy(dtype=float),
                    yerr=part["total_se"].to_numpy(dtype=float),
                    fmt="o",
                    markersize=2.5,
                    color=NEUTRAL_COLOR,
                    elinewidth=0.8,
                )
                totals.lines[0].set_gid(f"total/{family}/{variant}")
                if bottom is not None:
                    bottom.bar(
                        xs,
                        covariance,
                        _BAR_WIDTH,
                        color="white",
                        edgecolor=color,
                        hatch="/////",
                        gid=f"covariance-only/{family}/{variant}",
                    )
                    bottom.errorbar(
                        xs,
                        covariance,
                        yerr=part["covariance_se"].to_numpy(dtype=float),
                        fmt="none",
                        ecolor=NEUTRAL_COLOR,
                        elinewidth=0.8,
                    )
            top.set_title(family)
            panel_width = settings.width / len(families)
            set_category_ticks(top, x, tasks, panel_width)
            if column == 0:
                top.set_ylabel(r"$\mathrm{CE}^*$ (nats)")
            if bottom is not None:
                bottom.axhline(0.0, color=NEUTRAL_COLOR, linewidth=0.6)
                top.tick_params(axis="x", labelbottom=False)
                set_category_ticks(bottom, x, tasks, panel_width)
                if column == 0:
                    bottom.set_ylabel(r"Cov$(N, r)$ (nats)")
        handles = [Patch(color=VARIANT_COLORS[v], label=VARIANT_LABELS[v]) for v in variants]
        handles += [
            Patch(facecolor="0.55", edgecolor="0.55", label=r"$\mathrm{E}[N]\cdot\mathrm{E}[r]$"),
            Patch(facecolor="white", edgecolor="0.35", hatch="/////", label=r"Cov$(N, r)$"),
            Line2D(
                [],
                [],
                marker="o",
                markersize=2.5,
                color=NEUTRAL_COLOR,
                linestyle="none",
                label=r"$\mathrm{CE}^*$ ± SE",
            ),
        ]
        return finish_figure(figure, handles)


render_decomposition = renderer(
    DecompositionSettings, plot_decomposition, DECOMPOSITION_COLUMNS, "the metric columns"
)


def _offsets(variants: list[str]) -> dict[str, float]:
    """Bar offsets around each task's tick: side by side when both variants are present."""
    if len(variants) == 1:
        return {variants[0]: 0.0}
    return {v: (i - 0.5) * (_BAR_WIDTH + 0.02) for i, v in enumerate(variants)}
