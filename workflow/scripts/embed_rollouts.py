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
rollouts = pd.read_parquet(snakemake.input.rollouts, columns=["prompt_id", "sample", "text"])
# A fetched or local embedder is an input directory; a packaged one has none.
directory = snakemake.input.embedder or None
model = load_embedder(settings, name=name, directory=directory)
embeddings = embed_rollouts(rollouts, model, settings)
save_embeddings(embeddings, snakemake.output[0])
log.info("embedded %d rollouts with %s", len(rollouts), settings.model)
