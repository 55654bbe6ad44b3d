"""Write one task's prompt set to resources/prompts/{task}.jsonl."""

from script_setup import setup

log = setup(snakemake)

from canopy.data import prepare_prompts, write_prompts  # noqa: E402

task = snakemake.wildcards.task
prompts = prepare_prompts(task, dict(snakemake.params.spec), seed=snakemake.params.seed)
write_prompts(prompts, snakemake.output[0])
log.info("task %s: %d prompts from source %s", task, len(prompts), snakemake.params.spec["source"])
