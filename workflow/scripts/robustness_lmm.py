"""Robustness: a linear mixed model on logit(D) with the same controls (pymer4)."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.robustness import lmm_robustness  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
table = lmm_robustness(pd.read_parquet(snakemake.input[0]), settings, snakemake.output[0])
log.info("\n%s", table.to_string(index=False))
