"""Write one task's prompt set to resources/prompts/{task}.jsonl and where it came from beside it.

Only a `source: hub` task reaches the network: its revision is resolved to a commit first, and the
data set is loaded at that commit, so the record names exactly what was read.
"""

from script_setup import setup

spec = dict(snakemake.params.spec)
log = setup(snakemake, network=spec["source"] == "hub")

from canopy.io import write_json  # noqa: E402
from canopy.prompts import prepare_prompts, prompt_source_record, write_prompts  # noqa: E402

task = snakemake.wildcards.task
record = prompt_source_record(task, spec)
if "commit" in record:
    spec["revision"] = record["commit"]
prompts = prepare_prompts(task, spec, seed=snakemake.params.seed)
write_prompts(prompts, snakemake.output.prompts)
write_json(record, snakemake.output.record)
log.info("task %s: %d prompts from %s", task, len(prompts), record)
