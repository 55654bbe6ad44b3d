"""Semantic entropy of each prompt's rollouts (bidirectional-entailment clusters, NLI model)."""

from script_setup import setup

log = setup(snakemake)

from canopy.semantic_entropy import SemanticEntropySettings, write_semantic_entropy  # noqa: E402

settings = SemanticEntropySettings.from_config(snakemake.params.settings)
table = write_semantic_entropy(snakemake.input[0], snakemake.output[0], settings)
log.info(
    "%d prompts: mean semantic entropy %.3f nats, mean %.1f clusters",
    len(table),
    table["semantic_entropy"].mean(),
    table["n_semantic_clusters"].mean(),
)
