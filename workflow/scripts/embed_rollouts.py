"""Embed every rollout text of one model and task (cached apart from the diversity scores)."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.diversity import (  # noqa: E402
    EmbedderSettings,
    embed_rollouts,
    load_embedder,
    save_embeddings,
)

name = snakemake.wildcards.embedder
settings = EmbedderSettings.from_config(snakemake.params.settings, name=name)
rollouts = pd.read_parquet(snakemake.input[0], columns=["prompt_id", "sample", "text"])
embeddings = embed_rollouts(rollouts, load_embedder(settings, name=name), settings)
save_embeddings(embeddings, snakemake.output[0])
log.info("embedded %d rollouts with %s", len(rollouts), settings.model)
