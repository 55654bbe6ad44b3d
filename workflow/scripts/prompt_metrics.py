"""Per-prompt Canopy Entropy metrics and the entropy-rate trajectory of one model and task."""

import pandas as pd
from script_setup import setup

log = setup(snakemake)

from canopy.entropy import MetricSettings, entropy_trajectory, prompt_metrics  # noqa: E402
from canopy.io import write_parquet  # noqa: E402

w = snakemake.wildcards
rollouts = pd.read_parquet(snakemake.input[0])
settings = MetricSettings.from_config(snakemake.params.settings)
metrics = prompt_metrics(rollouts, settings, label=f"{w.family}/{w.variant} on {w.task}")
write_parquet(metrics, snakemake.output.metrics)
write_parquet(entropy_trajectory(rollouts), snakemake.output.trajectory)
log.info("%d prompts: mean CE* %.3f nats", len(metrics), metrics["canopy_entropy"].mean())
