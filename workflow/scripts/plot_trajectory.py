"""Figure 2: mean per-step entropy by generation step, from the trajectory tables."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import keyed_paths, render_trajectory  # noqa: E402

render_figure(
    snakemake, render_trajectory, keyed_paths(snakemake.params.matrix, snakemake.input.trajectories)
)
