"""The paper's figures as library functions.

Each figure has a frozen settings model (in canopy.config.figures; ``<Name>Settings.from_config``
takes the figure's ``figures.<name>`` block and rejects unknown keys by name), a ``plot_<name>``
function that draws it from DataFrames (testable with synthetic frames, usable from a notebook) and a
``render_<name>`` function that reads the workflow's files and writes PDF and PNG atomically.

=============  ==========================================================================
decomposition  CE* = E[N]·E[r] + Cov(N, r) by variant, per family and task
trajectory     mean per-step entropy by generation step, with an SE band
lengths        sequence-length distributions with the max_new_tokens cap
variance       within-prompt variances of H_i, N_i and r_i across prompts
slopes         the GLMM entropy-rate slope by variant, their ratio, D vs R̄ scatter
residuals      DHARMa-style QQ and residual-vs-predicted diagnostics
rho            mean ρ(N, r_N) by family, task and variant with bootstrap intervals
forest         ablation forest plot: slope ratio and ρ difference per sweep point
power          the power planner: slope-ratio CI width and power against prompts
=============  ==========================================================================
"""

from canopy.figures.common import FigureSettings, keyed_paths, read_matrix_tables
from canopy.figures.decomposition import DecompositionSettings, decomposition_summary
from canopy.figures.decomposition import plot_decomposition, render_decomposition
from canopy.figures.forest import ForestSettings, forest_rows, plot_forest, render_forest
from canopy.figures.lengths import LengthsSettings, plot_lengths, render_lengths
from canopy.figures.power import PowerSettings, plot_power, render_power
from canopy.figures.residuals import ResidualsSettings, diagnostic_p_values, plot_residuals
from canopy.figures.residuals import render_residuals
from canopy.figures.rho import RhoSettings, plot_rho, render_rho, rho_summary
from canopy.figures.slopes import SlopesSettings, plot_slopes, render_slopes
from canopy.figures.style import COLUMN_WIDTH, FULL_WIDTH, VARIANT_COLORS, VARIANT_LABELS
from canopy.figures.style import save_figure
from canopy.figures.trajectory import TrajectorySettings, plot_trajectory, render_trajectory
from canopy.figures.variance import VarianceSettings, plot_variance, render_variance
from canopy.figures.variance import within_prompt_variances

#: figure name (the key under config["figures"]) -> its settings class.
SETTINGS_CLASSES: dict[str, type[FigureSettings]] = {
    cls.figure: cls
    for cls in (
        DecompositionSettings,
        TrajectorySettings,
        LengthsSettings,
        VarianceSettings,
        SlopesSettings,
        ResidualsSettings,
        RhoSettings,
        ForestSettings,
        PowerSettings,
    )
}

__all__ = [
    "COLUMN_WIDTH",
    "FULL_WIDTH",
    "VARIANT_COLORS",
    "VARIANT_LABELS",
    "SETTINGS_CLASSES",
    "FigureSettings",
    "keyed_paths",
    "read_matrix_tables",
    "save_figure",
    "DecompositionSettings",
    "decomposition_summary",
    "plot_decomposition",
    "render_decomposition",
    "TrajectorySettings",
    "plot_trajectory",
    "render_trajectory",
    "LengthsSettings",
    "plot_lengths",
    "render_lengths",
    "VarianceSettings",
    "within_prompt_variances",
    "plot_variance",
    "render_variance",
    "SlopesSettings",
    "plot_slopes",
    "render_slopes",
    "ResidualsSettings",
    "diagnostic_p_values",
    "plot_residuals",
    "render_residuals",
    "RhoSettings",
    "rho_summary",
    "plot_rho",
    "render_rho",
    "ForestSettings",
    "forest_rows",
    "plot_forest",
    "render_forest",
    "PowerSettings",
    "plot_power",
    "render_power",
]
