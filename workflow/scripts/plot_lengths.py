"""Figure 3: sequence-length distributions with the max_new_tokens cap, from the rollout tables."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import keyed_paths, render_lengths  # noqa: E402

render_figure(
    snakemake,
    render_lengths,
    keyed_paths(snakemake.params.matrix, snakemake.input.rollouts),
    max_new_tokens=snakemake.params.max_new_tokens,
)
