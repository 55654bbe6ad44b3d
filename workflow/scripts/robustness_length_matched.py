"""Robustness: base and fine-tuned rollouts subsampled to the same length distribution."""

from pathlib import Path

import numpy as np
import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.robustness import length_matched  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

COLUMNS = ["prompt_id", "sample", "n_steps", "sum_entropy", "hit_eos", "truncated"]
keys = [tuple(key) for key in snakemake.params.matrix]
rollouts = {
    key: pd.read_parquet(path, columns=COLUMNS) for key, path in zip(keys, snakemake.input.rollouts)
}
# One embeddings folder per (family, variant, task) key, holding <task>.npz.
embeddings = {
    key: dict(np.load(Path(folder) / f"{key[2]}.npz", allow_pickle=False))
    for key, folder in zip(keys, snakemake.input.embeddings)
}
settings = StatsSettings.from_config(snakemake.params.settings)
table = length_matched(rollouts, embeddings, settings, snakemake.output[0])
log.info("\n%s", table.to_string(index=False))
