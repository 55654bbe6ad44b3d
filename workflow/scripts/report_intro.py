"""The report's opening section: workflow.rst rendered with this run's models and truncation."""

from script_setup import setup

log = setup(snakemake)

from canopy.overview import describe_rows, write_intro  # noqa: E402

pairs = [tuple(pair) for pair in snakemake.params.pairs]
# The settings workflow.rst quotes, and the family and task names it lists.
config = {
    **snakemake.params.config,
    "families": dict.fromkeys(snakemake.params.families, {}),
    "tasks": dict.fromkeys(snakemake.params.tasks, {}),
    "embedders": dict.fromkeys(snakemake.params.embedders, {}),
}
measured = write_intro(
    snakemake.input.template,
    config,
    dict(zip([tuple(key) for key in snakemake.params.matrix], snakemake.input.rollouts)),
    dict(zip(pairs, snakemake.input.models)),
    dict(zip(pairs, snakemake.params.sources)),
    snakemake.output[0],
    sampling=snakemake.params.sampling,
)
log.info("truncation per model and task:\n%s", describe_rows(measured["truncation"]))
