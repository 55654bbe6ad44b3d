"""The power planner: panels with more prompts simulated from the Beta GLMM fit and refitted."""

from pathlib import Path

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.power import plan_power  # noqa: E402
from canopy.stats import StatsSettings  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
plan = plan_power(
    pd.read_parquet(snakemake.input.panel),
    Path(snakemake.input.summary).parent,
    settings,
    snakemake.output.power,
    snakemake.output.simulations,
    workers=snakemake.threads,
)
log.info(
    "%d refits on %d worker(s) in %.0f s\n%s",
    len(plan.simulations),
    snakemake.threads,
    plan.seconds,
    plan.table.to_string(index=False),
)
