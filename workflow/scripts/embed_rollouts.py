"""Embed every rollout text of one model, one file per task (cached apart from the diversity scores)."""

from pathlib import Path

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
settings = EmbedderSettings.from_config(snakemake.params.settings, where=f"embedders.{name}")
# A fetched or local embedder is an input directory; a packaged one has none.
model = load_embedder(settings, name=name, directory=snakemake.input.embedder or None)
# The output is the model's folder; each task's rollouts file <task>.parquet gives <task>.npz.
folder = Path(snakemake.output[0])
folder.mkdir(parents=True, exist_ok=True)
for rollouts_path in snakemake.input.rollouts:
    rollouts = pd.read_parquet(rollouts_path, columns=["prompt_id", "sample", "text"])
    output = folder / f"{Path(rollouts_path).stem}.npz"
    save_embeddings(embed_rollouts(rollouts, model, settings), output)
    log.info("embedded %d rollouts of %s with %s", len(rollouts), rollouts_path, settings.model)
