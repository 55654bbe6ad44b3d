"""Join every model's per-prompt metrics and diversity into the analysis panel."""

from script_setup import setup

log = setup(snakemake)

from canopy.io import write_parquet  # noqa: E402
from canopy.panel import read_panel_inputs  # noqa: E402

keys = [tuple(key) for key in snakemake.params.matrix]
panel = read_panel_inputs(
    dict(zip(keys, snakemake.input.metrics)),
    dict(zip(keys, snakemake.input.diversity)),
    dict(zip(keys, snakemake.input.semantic)) if snakemake.input.semantic else None,
)
write_parquet(panel, snakemake.output[0])
log.info("panel: %d rows, %d prompts", len(panel), panel["prompt_uid"].nunique())
