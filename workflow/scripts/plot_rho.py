"""Figure 7: mean rho(N, r_N) by family, task and variant with prompt-bootstrap intervals."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import keyed_paths, render_rho  # noqa: E402

render_rho(
    keyed_paths(snakemake.params.matrix, snakemake.input.metrics),
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
