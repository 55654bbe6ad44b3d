"""One example rollout per model and task of the first sampling setting, next to its prompt."""

from script_setup import setup

log = setup(snakemake)

from canopy.io import write_tsv  # noqa: E402
from canopy.report import example_rollouts  # noqa: E402

table = example_rollouts(
    dict(zip([tuple(key) for key in snakemake.params.matrix], snakemake.input.rollouts)),
    dict(zip(snakemake.params.tasks, snakemake.input.prompts)),
)
write_tsv(table, snakemake.output[0])
log.info("\n%s", table.drop(columns=["prompt", "text"]).to_string(index=False))
