"""The headline table: CE*, entropy rate and diversity by variant, and the slope ratio."""

from script_setup import setup

log = setup(snakemake)

from canopy.io import write_tsv  # noqa: E402
from canopy.report import headline_table  # noqa: E402

table = headline_table(
    [tuple(c) for c in snakemake.params.combinations],
    snakemake.input.panels,
    snakemake.input.slopes,
)
write_tsv(table, snakemake.output[0])
log.info("\n%s", table.to_string(index=False))
