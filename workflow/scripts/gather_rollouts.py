"""Gather the chunk tables of one model and task into its rollout table."""

from script_setup import setup

log = setup(snakemake)

from canopy.sampling import gather_rollouts  # noqa: E402

gather_rollouts(snakemake.input.chunks, snakemake.input.prompts, snakemake.output[0], progress=log)
