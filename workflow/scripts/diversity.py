"""Semantic and lexical diversity of each prompt's rollouts."""

from pathlib import Path

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.diversity import DiversitySettings, diversity_table, load_embeddings  # noqa: E402
from canopy.io import write_parquet  # noqa: E402

settings = DiversitySettings.from_config(snakemake.params.settings)
rollouts = pd.read_parquet(snakemake.input.rollouts, columns=["prompt_id", "sample", "text"])
# The input is the model's embeddings folder, one <task>.npz per task.
embeddings = load_embeddings(Path(snakemake.input.embeddings) / f"{snakemake.wildcards.task}.npz")
table = diversity_table(embeddings, rollouts, settings)
write_parquet(table, snakemake.output[0])
log.info("%d prompts: mean D %.3f", len(table), table["dissimilarity"].mean())
