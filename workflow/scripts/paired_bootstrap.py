"""Paired bootstrap of every prompt metric, fine-tuned vs base, per family and task."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.bootstrap import BootstrapSettings, estimator_notes, paired_bootstrap  # noqa: E402
from canopy.io import write_tsv  # noqa: E402

METRICS = [
    "canopy_entropy",
    "canopy_entropy_surprisal",
    "mean_length",
    "mean_rate",
    "cov_length_rate",
    "rho_pearson",
    "length_entropy_miller_madow",
    "length_entropy_chao_shen",
    "conditional_entropy_given_length",
    "branching_factor",
    "generation_perplexity",
    "truncation_rate",
    "dissimilarity",
    "vendi",
]
# Present only when diversity.semantic_entropy is set.
OPTIONAL = ["semantic_entropy", "semantic_entropy_weighted"]
settings = BootstrapSettings.from_config(snakemake.params.settings)
panel = pd.read_parquet(snakemake.input[0])
table = paired_bootstrap(
    panel,
    METRICS + [name for name in OPTIONAL if name in panel.columns],
    resamples=settings.resamples,
    confidence=settings.confidence,
    seed=settings.seed,
)
table["note"] = estimator_notes(table, panel)
write_tsv(table, snakemake.output[0])
log.info("paired bootstrap: %d rows", len(table))
