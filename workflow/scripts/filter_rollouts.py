"""Score a rollout table with a reward model and keep each prompt's best share."""

from script_setup import setup

log = setup(snakemake)

from canopy.filtering import FilterSettings, write_filtered_rollouts  # noqa: E402

settings = FilterSettings.from_config(
    snakemake.params.settings, where=f"sampling.{snakemake.wildcards.sampling}.filter"
)
scores = write_filtered_rollouts(
    snakemake.input.rollouts,
    snakemake.input.prompts,
    snakemake.output[0],
    snakemake.output.scores,
    settings,
    model_dir=snakemake.input.reward_model or None,
)
log.info(
    "%d of %d rollouts kept (keep %.2f); mean reward kept %.3f, dropped %.3f",
    int(scores["kept"].sum()),
    len(scores),
    settings.keep,
    scores.loc[scores["kept"], "reward"].mean(),
    scores.loc[~scores["kept"], "reward"].mean(),
)
