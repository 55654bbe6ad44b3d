"""Figure 6: DHARMa-style diagnostics of the Beta GLMM.

Scaled (quantile) residuals are the share of responses simulated from the fitted model that fall
below the observed one; for a well-specified model they are uniform on [0, 1] whatever the
response distribution. Left: their QQ plot against uniform quantiles, with the KS, dispersion and
outlier tests' p-values (whichever the diagnostics stage wrote). Right: scaled residual against
the rank-transformed prediction, with the empirical 25/50/75 % quantiles of the residuals in
equal-count bins of the prediction; for a good fit these lie on the dashed lines at 0.25/0.5/0.75.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canopy.config import VARIANTS
from canopy.config.figures import ResidualsSettings
from canopy.figures.common import check_variants, read_table, require_columns
from canopy.figures.common import Config, FilePath, settings_for
from canopy.figures.style import NEUTRAL_COLOR, VARIANT_COLORS, figure_style
from canopy.figures.style import finish_figure, new_figure, save_figure, variant_handles
from canopy.io import read_json

__all__ = [
    "ResidualsSettings",
    "RESIDUAL_COLUMNS",
    "QUANTILE_LEVELS",
    "diagnostic_p_values",
    "uniform_qq",
    "binned_quantiles",
    "plot_residuals",
    "render_residuals",
]

#: Columns of ``diagnostics/residuals.tsv`` the figure reads.
RESIDUAL_COLUMNS = ["variant", "predicted", "scaled_residual"]
#: Residual quantiles drawn against the prediction (DHARMa draws the same three).
QUANTILE_LEVELS = (0.25, 0.5, 0.75)

# Test keys of tests.json and how the figure names them, in display order: the flat keys the
# figure was specified with (ks_p, ...) and the nested objects canopy.stats writes
# ({"uniformity": {"statistic": ..., "p_value": ...}, ...}).
_KNOWN_TESTS = {
    "ks_p": "KS",
    "uniformity": "KS",
    "ks": "KS",
    "dispersion_p": "dispersion",
    "dispersion": "dispersion",
    "outlier_p": "outliers",
    "outliers": "outliers",
}


def diagnostic_p_values(tests: Mapping[str, Any]) -> dict[str, float]:
    """Display name -> p-value for every test p-value found in ``tests.json``.

    Reads defensively: the KS (uniformity), dispersion and outlier tests first, as flat keys
    (``ks_p``) or as objects holding a ``p_value`` (``{"uniformity": {"p_value": 0.3}}``, what
    :mod:`canopy.stats` writes), then any other numeric entry whose key ends in ``_p``,
    ``p_value`` or ``pvalue``, also one level down. Missing or non-numeric values are skipped
    rather than failing the figure.
    """
    found: dict[str, float] = {}
    suffixes = ("_p", "p_value", "pvalue", "p.value")

    def number(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) else None

    def p_value(key: str, value: Any) -> float | None:
        if isinstance(value, Mapping):
            for inner_key, inner in value.items():
                if str(inner_key) == "p" or str(inner_key).endswith(suffixes):
                    if (p := number(inner)) is not None:
                        return p
            return None
        # A bare number under a test's name may be its statistic: only *_p keys are p-values.
        return number(value) if key.endswith(suffixes) else None

    # Known tests first, in display order, then whatever else looks like a p-value.
    ordered = [k for k in _KNOWN_TESTS if k in tests] + [k for k in tests if k not in _KNOWN_TESTS]
    for key in ordered:
        p = p_value(str(key), tests[key])
        if p is None:
            continue
        name = _KNOWN_TESTS.get(key, str(key).removesuffix("_pvalue").removesuffix("_p"))
        found.setdefault(name, p)
    return found


def uniform_qq(residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expected uniform quantiles (i - 0.5) / n, sorted residuals) for a QQ plot."""
    observed = np.sort(np.asarray(residuals, dtype=float))
    n = observed.size
    expected = (np.arange(1, n + 1) - 0.5) / n
    return expected, observed


def binned_quantiles(
    x: np.ndarray, y: np.ndarray, bins: int, levels: tuple[float, ...] = QUANTILE_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of ``y`` in ``bins`` equal-count bins of ``x``.

    Returns (bin centres as mean x of each bin, array of shape (bins, len(levels))). Fewer bins
    are used when there are fewer points than bins.
    """
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    x_sorted, y_sorted = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    splits = np.array_split(np.arange(x_sorted.size), min(bins, x_sorted.size))
    groups = [g for g in splits if g.size]
    centres = np.array([x_sorted[g].mean() for g in groups])
    quantiles = np.array([np.quantile(y_sorted[g], levels) for g in groups])
    return centres, quantiles.reshape(len(groups), len(levels))


def plot_residuals(
    residuals: pd.DataFrame, tests: Mapping[str, Any], settings: ResidualsSettings
) -> Figure:
    """Draw the QQ and residual-vs-prediction panels from ``residuals.tsv`` and ``tests.json``."""
    require_columns(residuals, RESIDUAL_COLUMNS, "residuals")
    variants = check_variants(residuals, "residuals")
    scaled = residuals["scaled_residual"].to_numpy(dtype=float)
    predicted = residuals["predicted"].to_numpy(dtype=float)
    usable = np.isfinite(scaled) & np.isfinite(predicted)
    if not usable.any():
        raise ValueError(
            "the residuals table has no row with a finite scaled residual and prediction"
        )
    if ((scaled[usable] < 0) | (scaled[usable] > 1)).any():
        raise ValueError(
            "scaled residuals must lie in [0, 1] (they are simulation quantiles); "
            "check the diagnostics stage's residuals.tsv"
        )
    residuals = residuals[usable]
    scaled, predicted = scaled[usable], predicted[usable]
    # Rank-transform the prediction to (0, 1) as DHARMa does, so points spread evenly along x.
    rank = (pd.Series(predicted).rank(method="average").to_numpy() - 0.5) / predicted.size
    p_values = diagnostic_p_values(tests)

    # Side by side at full width; stacked at column width, where side by side would be cramped.
    stacked = settings.width < 5.0
    height = settings.figure_height(2 if stacked else 1, 2.3, 0.35)
    with figure_style():
        figure = new_figure(settings.width, height)
        ax_qq, ax_res = figure.subplots(2, 1) if stacked else figure.subplots(1, 2)

        expected, observed = uniform_qq(scaled)
        ax_qq.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8)
        ax_qq.plot(
            expected,
            observed,
            linestyle="none",
            marker="o",
            markersize=1.5,
            color=NEUTRAL_COLOR,
            alpha=0.7,
            gid="qq",
            rasterized=True,
        )
        ax_qq.set_xlabel("expected (uniform quantile)")
        ax_qq.set_ylabel("observed scaled residual")
        title = "QQ plot"
        if "KS" in p_values:
            title += f" (KS p = {p_values['KS']:.3g})"
        ax_qq.set_title(title)
        if p_values:
            text = "\n".join(f"{name} p = {value:.3g}" for name, value in p_values.items())
            ax_qq.text(
                0.97,
                0.03,
                text,
                transform=ax_qq.transAxes,
                ha="right",
                va="bottom",
                fontsize=6.5,
                bbox={
                    "facecolor": "white",
                    "edgecolor": "0.7",
                    "linewidth": 0.5,
                    "boxstyle": "round,pad=0.3",
                },
            )
        ax_qq.set_xlim(0, 1)
        ax_qq.set_ylim(0, 1)
        ax_qq.set_aspect("equal", adjustable="box")

        for variant in VARIANTS:
            if variant not in variants:
                continue
            mask = (residuals["variant"] == variant).to_numpy()
            ax_res.scatter(
                rank[mask],
                scaled[mask],
                s=2.5,
                color=VARIANT_COLORS[variant],
                alpha=settings.point_alpha,
                linewidths=0,
                gid=f"residuals/{variant}",
                rasterized=True,
            )
        for level in QUANTILE_LEVELS:
            ax_res.axhline(level, color="0.5", linestyle="--", linewidth=0.7)
        centres, quantiles = binned_quantiles(rank, scaled, settings.quantile_bins)
        for j, level in enumerate(QUANTILE_LEVELS):
            ax_res.plot(
                centres,
                quantiles[:, j],
                color=NEUTRAL_COLOR,
                linewidth=1.1,
                marker="o",
                markersize=1.8,
                gid=f"quantile/{level}",
            )
        ax_res.grid(False)  # the dashed reference quantiles are the only horizontal lines
        ax_res.set_xlim(0, 1)
        ax_res.set_ylim(0, 1)
        ax_res.set_xlabel("prediction (rank-transformed)")
        ax_res.set_ylabel("scaled residual")
        ax_res.set_title("residual vs prediction")
        handles = variant_handles(variants, kind="marker")
        handles.append(
            Line2D([], [], color=NEUTRAL_COLOR, linewidth=1.1, label="25/50/75% quantiles")
        )
        return finish_figure(figure, handles)


def render_residuals(
    residuals_path: FilePath,
    tests_path: FilePath,
    settings: Config | ResidualsSettings,
    pdf: FilePath,
    png: FilePath,
) -> Figure:
    """Read ``residuals.tsv`` and ``tests.json``, draw and write PDF and PNG."""
    settings = settings_for(ResidualsSettings, settings)
    residuals = read_table(residuals_path)
    tests = read_json(tests_path)
    if not isinstance(tests, Mapping):
        raise ValueError(
            f"{tests_path}: expected a JSON object of test results, got {type(tests).__name__}"
        )
    return save_figure(plot_residuals(residuals, tests, settings), pdf, png, dpi=settings.dpi)
