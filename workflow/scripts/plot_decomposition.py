"""Figure 1: CE* = E[N]·E[r] + Cov(N, r) by variant, from the per-prompt metric tables."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import keyed_paths, render_decomposition  # noqa: E402

render_figure(
    snakemake, render_decomposition, keyed_paths(snakemake.params.matrix, snakemake.input.metrics)
)
