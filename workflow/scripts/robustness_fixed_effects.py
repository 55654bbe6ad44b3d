"""Robustness: the fixed-effects specification with log mean length (statsmodels)."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.robustness import fixed_effects_robustness  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
table = fixed_effects_robustness(pd.read_parquet(snakemake.input[0]), settings, snakemake.output[0])
log.info("\n%s", table.to_string(index=False))
