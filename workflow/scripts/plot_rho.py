"""Figure 7: mean rho(N, r_N) by family, task and variant with prompt-bootstrap intervals."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import keyed_paths, render_rho  # noqa: E402

render_figure(snakemake, render_rho, keyed_paths(snakemake.params.matrix, snakemake.input.metrics))
