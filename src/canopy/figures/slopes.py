"""Figure 5: the headline, the entropy-rate slope of semantic diversity by variant.

Top left: the Beta GLMM's slope of logit D on the standardised mean entropy rate R_sc for base
and fine-tuned models, with 95 % confidence intervals. Top right: their ratio (fine-tuned /
base), one point per method in the slopes table (delta method, bootstrap), with the no-change
line at 1. Below (optional): the panel's prompts, D against R̄ by variant, so the reader sees the
data behind the slopes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from canopy.config import VARIANTS
from canopy.config.figures import SlopesSettings
from canopy.figures.common import check_variants, read_table, require_columns
from canopy.figures.common import Config, FilePath, settings_for
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, VARIANT_LABELS
from canopy.figures.style import figure_style, finish_figure, new_figure, save_figure
from canopy.figures.style import set_category_ticks, variant_handles

__all__ = ["SlopesSettings", "SLOPE_COLUMNS", "plot_slopes", "render_slopes"]

#: Columns of ``glmm/slopes.tsv`` the figure reads.
SLOPE_COLUMNS = ["variant", "slope", "ci_low", "ci_high"]


def plot_slopes(
    slopes: pd.DataFrame, settings: SlopesSettings, panel: pd.DataFrame | None = None
) -> Figure:
    """Draw slopes by variant with their CIs, the ratio, and optionally the D vs R̄ scatter.

    ``slopes`` is ``glmm/slopes.tsv``: rows with variant base, finetuned and ratio (ratio rows
    name their ``method``). ``panel`` (columns variant, D, R) is drawn when ``show_scatter``.
    """
    require_columns(slopes, SLOPE_COLUMNS, "slopes")
    variant_rows = slopes[slopes["variant"].isin(VARIANTS)]
    ratio_rows = slopes[slopes["variant"] == "ratio"]
    unknown = sorted(set(slopes["variant"].astype(str)) - set(VARIANTS) - {"ratio"})
    if unknown:
        raise ValueError(f"the slopes table has unexpected variant(s) {', '.join(unknown)}")
    if variant_rows.empty:
        raise ValueError("the slopes table has no base or finetuned row")
    variants = [v for v in VARIANTS if v in set(variant_rows["variant"])]
    scatter = settings.show_scatter and panel is not None
    if settings.show_scatter and panel is None:
        raise ValueError(
            "show_scatter is true but no panel was given: pass the panel table "
            "or set figures.slopes.show_scatter to false"
        )
    if scatter:
        require_columns(panel, ["variant", "D", "R"], "panel")
        check_variants(panel, "panel")

    # Slope and ratio side by side, the scatter below across the full width: at the paper's
    # column width three panels in one row squeezed the tick labels and the scatter's axis label.
    height = settings.figure_height(2 if scatter else 1, 1.7, 0.3)
    columns = 2 if not ratio_rows.empty else 1
    panel_width = settings.width / columns
    with figure_style():
        figure = new_figure(settings.width, height)
        grid = figure.add_gridspec(2 if scatter else 1, columns)
        ax_slope = figure.add_subplot(grid[0, 0])
        for i, variant in enumerate(variants):
            row = variant_rows[variant_rows["variant"] == variant].iloc[0]
            _interval(ax_slope, i, row, VARIANT_COLORS[variant], f"slope/{variant}")
        ax_slope.axhline(0.0, color=NEUTRAL_COLOR, linewidth=0.6)
        set_category_ticks(
            ax_slope, np.arange(len(variants)), [VARIANT_LABELS[v] for v in variants], panel_width
        )
        ax_slope.set_xlim(-0.6, len(variants) - 0.4)
        ax_slope.set_ylabel(r"slope (logit $D$ per SD of $\bar R$)")
        ax_slope.set_title("slope (95% CI)")

        if not ratio_rows.empty:
            ax_ratio = figure.add_subplot(grid[0, 1])
            if "method" in ratio_rows.columns:
                methods = [str(m) for m in ratio_rows["method"]]
            else:
                methods = ["ratio"] * len(ratio_rows)
            for i, (method, (_, row)) in enumerate(zip(methods, ratio_rows.iterrows())):
                _interval(ax_ratio, i, row, NEUTRAL_COLOR, f"ratio/{method}")
                # Above the interval, not beside it, where the neighbouring method's value sat.
                top = row["ci_high"] if np.isfinite(row["ci_high"]) else row["slope"]
                ax_ratio.annotate(
                    f"{row['slope']:.2f}",
                    (i, top),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
            ax_ratio.axhline(1.0, color="0.5", linestyle=":", linewidth=0.8)
            set_category_ticks(ax_ratio, np.arange(len(methods)), methods, panel_width)
            ax_ratio.set_xlim(-0.6, len(methods) - 0.4)
            ax_ratio.margins(y=0.12)
            ax_ratio.set_ylabel("Fine-tuned / Base slope")
            ax_ratio.set_title("ratio (95% CI)")

        if scatter:
            ax_scatter = figure.add_subplot(grid[1, :])
            for variant in variants:
                part = panel[panel["variant"] == variant]
                ax_scatter.scatter(
                    part["R"].to_numpy(dtype=float),
                    part["D"].to_numpy(dtype=float),
                    s=3,
                    color=VARIANT_COLORS[variant],
                    alpha=settings.scatter_alpha,
                    linewidths=0,
                    label=VARIANT_LABELS[variant],
                    gid=f"scatter/{variant}",
                    rasterized=True,
                )
            ax_scatter.set_xlabel(r"mean entropy rate $\bar R$ (nats/token)")
            ax_scatter.set_ylabel("semantic diversity $D$")
            ax_scatter.set_title("prompts")
            ax_scatter.legend(handles=variant_handles(variants, kind="marker"), loc="best")
        return finish_figure(figure)


def render_slopes(
    slopes_path: FilePath,
    settings: Config | SlopesSettings,
    pdf: FilePath,
    png: FilePath,
    panel_path: FilePath | None = None,
) -> Figure:
    """Read ``glmm/slopes.tsv`` (and the panel when scattering), draw and write PDF and PNG."""
    settings = settings_for(SlopesSettings, settings)
    slopes = read_table(slopes_path)
    panel = None
    if settings.show_scatter:
        if panel_path is None:
            raise ValueError("figures.slopes.show_scatter is true but no panel file was given")
        panel = pd.read_parquet(panel_path, columns=["family", "variant", "task", "D", "R"])
    return save_figure(plot_slopes(slopes, settings, panel), pdf, png, dpi=settings.dpi)


def _interval(ax: Any, x: float, row: pd.Series, color: str, gid: str) -> None:
    """A point estimate with its (possibly asymmetric) confidence interval."""
    estimate = float(row["slope"])
    low, high = float(row["ci_low"]), float(row["ci_high"])
    error = np.array([[estimate - low], [high - estimate]])
    if not np.all(np.isfinite(error)):
        error = None
    else:
        # A percentile interval may exclude its own point estimate; draw no negative arm.
        error = np.clip(error, 0.0, None)
    drawn = ax.errorbar(
        [x],
        [estimate],
        yerr=error,
        fmt="o",
        color=color,
        markersize=3.5,
        elinewidth=1.0,
        capsize=2.5,
    )
    drawn.lines[0].set_gid(gid)
