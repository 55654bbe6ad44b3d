"""Figure 5: the entropy-rate slope by variant and their ratio, from glmm/slopes.tsv (+ panel)."""

from script_setup import setup

log = setup(snakemake)

from canopy.figures import render_slopes  # noqa: E402

render_slopes(
    snakemake.input.slopes,
    snakemake.params.settings,
    pdf=snakemake.output.pdf,
    png=snakemake.output.png,
    # An empty input (show_scatter false) is an empty list here.
    panel_path=snakemake.input.panel or None,
)
log.info("wrote %s and %s", snakemake.output.pdf, snakemake.output.png)
