"""Figure 8: the ablation forest plot (slope ratio and rho difference per sweep point)."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import render_forest  # noqa: E402

render_figure(snakemake, render_forest, snakemake.input.table)
