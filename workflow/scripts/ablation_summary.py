"""The ablation summary: slope ratio and rho difference for every sweep point."""

from script_setup import setup

log = setup(snakemake)

from canopy.bootstrap import BootstrapSettings  # noqa: E402
from canopy.io import write_tsv  # noqa: E402
from canopy.report import ablation_table  # noqa: E402

table = ablation_table(
    [tuple(c) for c in snakemake.params.combinations],
    snakemake.input.panels,
    snakemake.input.slopes,
    BootstrapSettings.from_config(snakemake.params.bootstrap),
)
write_tsv(table, snakemake.output[0])
log.info("\n%s", table.to_string(index=False))
