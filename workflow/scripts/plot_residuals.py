"""Figure 6: DHARMa-style residual diagnostics of the Beta GLMM."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import render_residuals  # noqa: E402

render_figure(snakemake, render_residuals, snakemake.input.residuals, snakemake.input.tests)
