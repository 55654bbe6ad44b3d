"""``figures.<name>``: one settings block per figure (canopy.figures draws them); editing one
reruns only that figure."""

from __future__ import annotations

from typing import ClassVar, Literal

from canopy.config.base import Block
from canopy.config.types import (
    Level,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    Resamples,
    Share,
    TaskNames,
)

__all__ = [
    "COLUMN_WIDTH",
    "DecompositionSettings",
    "FULL_WIDTH",
    "FigureSettings",
    "FiguresSettings",
    "ForestSettings",
    "LengthsSettings",
    "PowerSettings",
    "ResidualsSettings",
    "RhoSettings",
    "SlopesSettings",
    "TrajectorySettings",
    "VarianceSettings",
]

#: Inches: one column of the paper, and the full text width.
COLUMN_WIDTH = 3.4
FULL_WIDTH = 7.0


class FigureSettings(Block):
    """Settings every figure has; each figure's settings class adds its own. Sizes are in inches
    (3.4 = one paper column, 7 = full width); ``dpi`` applies to the PNG (the PDF is vector)."""

    #: The figure's key under ``figures``.
    figure: ClassVar[str] = "figure"

    width: PositiveNumber = FULL_WIDTH
    """Inches (3.4 = one paper column, 7 = full width)."""
    height: PositiveNumber | None = None
    """Inches; null sizes it from the number of panel rows."""
    dpi: PositiveInt = 300
    """Resolution of the PNG."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.where = f"figures.{cls.figure}"

    def figure_height(self, rows: int, row_height: float, extra: float) -> float:
        """``height`` if set, otherwise ``rows * row_height + extra`` (legend and labels)."""
        return self.height if self.height is not None else rows * row_height + extra


class DecompositionSettings(FigureSettings):
    """CE* = E[N]E[r] + Cov(N, r) by variant, family and task."""

    figure: ClassVar[str] = "decomposition"

    tasks: TaskNames | None = None
    """Tasks to draw (null = all)."""
    error_bars: Literal["prompts", "rollouts"] = "prompts"
    """prompts: the SE of the mean CE* across prompts; rollouts: the pooled within-prompt SE
    sqrt(sum_p se_p^2) / P (the sampling error of the rollouts alone)."""
    show_covariance_panel: bool = True
    """Add a row with the covariance term alone."""


class TrajectorySettings(FigureSettings):
    """Mean per-step entropy by position."""

    figure: ClassVar[str] = "trajectory"

    tasks: TaskNames | None = None
    """Tasks to draw (null = all)."""
    max_positions: PositiveInt | None = None
    """Draw steps 1..max_positions only (null: all)."""
    min_active: PositiveInt = 5
    """Hide steps averaged over fewer running rollouts than this."""
    band_se: PositiveNumber = 1.0
    """Half-width of the band in standard errors (1.96: a 95 % interval)."""
    log_x: bool = False
    """Logarithmic step axis."""


class LengthsSettings(FigureSettings):
    """Distributions of rollout length N."""

    figure: ClassVar[str] = "lengths"

    tasks: TaskNames | None = None
    """Tasks to draw (null = all)."""
    bins: PositiveInt = 30
    """Histogram bins per panel."""
    log_scale: bool = False
    """Logarithmic length axis with log-spaced bins."""


class VarianceSettings(FigureSettings):
    """Within-prompt variances of H, N and r across prompts."""

    figure: ClassVar[str] = "variance"

    tasks: TaskNames | None = None
    """Tasks to draw (null = all)."""
    log_scale: bool = True
    """Logarithmic variance axis (variances across prompts span orders of magnitude)."""
    show_outliers: bool = True
    """Draw the points beyond the whiskers."""


class SlopesSettings(FigureSettings):
    """Entropy-rate slope by variant and their ratio, with 95 % CIs."""

    figure: ClassVar[str] = "slopes"

    show_scatter: bool = True
    """Add the panel's D vs R scatter (the data behind the slopes)."""
    scatter_alpha: Share = 0.35
    """Opacity of the scatter points (many prompts overlap): in (0, 1]."""


class ResidualsSettings(FigureSettings):
    """Simulation-residual QQ and residual-vs-predicted plots."""

    figure: ClassVar[str] = "residuals"

    quantile_bins: PositiveInt = 10
    """Equal-count bins of the rank-transformed prediction for the residual quantiles."""
    point_alpha: Share = 0.4
    """Opacity of the residual points: in (0, 1]."""


class RhoSettings(FigureSettings):
    """Mean length-rate correlation rho(N, r_N) by family, task and variant, with prompt-bootstrap
    intervals."""

    figure: ClassVar[str] = "rho"

    tasks: TaskNames | None = None
    """Tasks to draw (null = all)."""
    correlation: Literal["pearson", "spearman", "kendall"] = "pearson"
    """Per-prompt correlation drawn (over its rollouts)."""
    resamples: Resamples = 2000
    """Bootstrap resamples of prompts per point."""
    confidence: Level = 0.95
    seed: NonNegativeInt = 42

    @property
    def column(self) -> str:
        return f"rho_{self.correlation}"


class ForestSettings(FigureSettings):
    """Ablation forest plot: slope ratio and rho difference per sweep point (sampling x embedder)."""

    figure: ClassVar[str] = "forest"

    width: PositiveNumber = 2 * COLUMN_WIDTH
    """Inches (3.4 = one paper column, 7 = full width)."""
    height: PositiveNumber | None = None
    """Inches; null sizes it from the number of sweep points."""
    interval: Literal["delta", "bootstrap"] = "delta"
    """Slope-ratio interval: delta method or parametric bootstrap."""


class PowerSettings(FigureSettings):
    """The power planner's table: median slope-ratio CI width and the share of CIs that exclude 1,
    against prompts per (family, task, variant)."""

    figure: ClassVar[str] = "power"

    target: Share = 0.8
    """The power drawn as a reference line (0.8, the conventional planning target)."""


class FiguresSettings(Block):
    """``figures``: one settings block per figure; editing one reruns only that figure."""

    where = "figures"

    decomposition: DecompositionSettings = DecompositionSettings()
    trajectory: TrajectorySettings = TrajectorySettings()
    lengths: LengthsSettings = LengthsSettings()
    variance: VarianceSettings = VarianceSettings()
    slopes: SlopesSettings = SlopesSettings()
    residuals: ResidualsSettings = ResidualsSettings()
    rho: RhoSettings = RhoSettings()
    forest: ForestSettings = ForestSettings()
    power: PowerSettings = PowerSettings()
