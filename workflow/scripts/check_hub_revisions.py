"""Ask the hub whether any branch or tag this run fetched points to another commit now."""

from script_setup import setup

log = setup(snakemake, network=True)

from canopy.provenance import check_revisions, fetched_records  # noqa: E402

records = fetched_records(snakemake.input.fetched, snakemake.input.prompts)
for row in check_revisions(records):
    log.info("%s@%s: still at %s", row["repository"], row["revision"], row["now"])
log.info("%d fetched resources checked; no branch has moved", len(records))
