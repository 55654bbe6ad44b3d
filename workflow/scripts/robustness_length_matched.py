"""Robustness: base and fine-tuned rollouts subsampled to the same length distribution."""

from script_setup import setup

log = setup(snakemake)

from canopy.robustness import length_matched_from_files  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

keys = [tuple(key) for key in snakemake.params.matrix]
settings = StatsSettings.from_config(snakemake.params.settings)
length_matched_from_files(
    dict(zip(keys, snakemake.input.rollouts)),
    dict(zip(keys, snakemake.input.embeddings)),
    settings,
    snakemake.output[0],
)
