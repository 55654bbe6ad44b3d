"""Robustness: the fixed-effects specification with log mean length (statsmodels)."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.robustness import fixed_effects  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
fixed_effects(pd.read_parquet(snakemake.input[0]), settings, snakemake.output[0])
