"""Figure 2: mean per-step entropy by generation step, from the trajectory tables."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import keyed_paths, render_trajectory  # noqa: E402

render_trajectory(
    keyed_paths(snakemake.params.matrix, snakemake.input.trajectories),
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
