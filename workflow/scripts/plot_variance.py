"""Figure 4: within-prompt variances of H_i, N_i and r_i across prompts, from the rollout tables."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import keyed_paths, render_variance  # noqa: E402

render_figure(
    snakemake, render_variance, keyed_paths(snakemake.params.matrix, snakemake.input.rollouts)
)
