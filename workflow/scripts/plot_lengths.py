"""Figure 3: sequence-length distributions with the max_new_tokens cap, from the rollout tables."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import keyed_paths, render_lengths  # noqa: E402

render_lengths(
    keyed_paths(snakemake.params.matrix, snakemake.input.rollouts),
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
    max_new_tokens=snakemake.params.max_new_tokens,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
