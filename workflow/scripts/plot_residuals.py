"""Figure 6: DHARMa-style residual diagnostics of the Beta GLMM."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import render_residuals  # noqa: E402

render_residuals(
    snakemake.input.residuals,
    snakemake.input.tests,
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
