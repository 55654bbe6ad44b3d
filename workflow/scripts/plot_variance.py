"""Figure 4: within-prompt variances of H_i, N_i and r_i across prompts, from the rollout tables."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import keyed_paths, render_variance  # noqa: E402

render_variance(
    keyed_paths(snakemake.params.matrix, snakemake.input.rollouts),
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
