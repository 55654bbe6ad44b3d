"""Figure 1: CE* = E[N]·E[r] + Cov(N, r) by variant, from the per-prompt metric tables."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import keyed_paths, render_decomposition  # noqa: E402

render_decomposition(
    keyed_paths(snakemake.params.matrix, snakemake.input.metrics),
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
