"""Sample rollouts of one model on one task (or one chunk of its prompts), with the exact entropy
of every step (resumable)."""

from script_setup import setup

log = setup(snakemake)

from canopy.sampling import SamplingSettings, sample_task  # noqa: E402

budgets = {key: snakemake.resources[key] for key in ("max_batch_rows", "max_batch_tokens")}
settings = SamplingSettings.from_config({**snakemake.params.settings, **budgets})
sample_task(
    snakemake.input.model,
    snakemake.input.prompts,
    snakemake.wildcards.variant,
    settings,
    snakemake.output[0],
    chunk=snakemake.params.chunk,
    progress=log,
    **snakemake.params.chat,
    **snakemake.params.framing,
)
