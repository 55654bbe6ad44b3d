"""Robustness: a linear mixed model on logit(D) with the same controls (pymer4)."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.robustness import logit_lmm  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
logit_lmm(pd.read_parquet(snakemake.input[0]), settings, snakemake.output[0])
