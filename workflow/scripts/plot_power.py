"""Figure 9: the power planner's CI width and power against prompts, from power.tsv."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import render_power  # noqa: E402

render_power(
    snakemake.input.table,
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
