"""Semantic entropy of each prompt's rollouts (bidirectional-entailment clusters, NLI model)."""

from script_setup import setup

log = setup(snakemake)

from canopy.semantic_entropy import SemanticEntropySettings, write_semantic_entropy  # noqa: E402

settings = SemanticEntropySettings.from_config(snakemake.params.settings)
# A fetched NLI model is an input directory; a packaged or local one is found from the settings.
table = write_semantic_entropy(
    snakemake.input.rollouts,
    snakemake.output[0],
    settings,
    model_dir=snakemake.input.nli_model or None,
)
log.info(
    "%d prompts: mean semantic entropy %.3f nats, mean %.1f clusters",
    len(table),
    table["semantic_entropy"].mean(),
    table["n_semantic_clusters"].mean(),
)
