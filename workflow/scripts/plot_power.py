"""Figure 9: the power planner's CI width and power against prompts, from power.tsv."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import render_power  # noqa: E402

render_figure(snakemake, render_power, snakemake.input.table)
