"""Figure 8: the ablation forest plot (slope ratio and rho difference per sweep point)."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import render_forest  # noqa: E402

render_forest(
    snakemake.input.table,
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
