"""Figure 5: the entropy-rate slope by variant and their ratio, from glmm/slopes.tsv (+ panel)."""

from script_setup import render_figure, setup

setup(snakemake)

from canopy.figures import render_slopes  # noqa: E402

render_figure(
    snakemake,
    render_slopes,
    snakemake.input.slopes,
    # An empty input (show_scatter false) is an empty list here.
    panel_path=snakemake.input.panel or None,
)
