"""Fit the Beta mixed-effects regression of diversity on entropy rate x variant (glmmTMB)."""

from pathlib import Path

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.stats import StatsSettings, fit_beta_glmm  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
result = fit_beta_glmm(
    pd.read_parquet(snakemake.input[0]), settings, Path(snakemake.output.summary).parent
)
log.info("%s", result)
