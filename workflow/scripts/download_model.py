"""Fetch a hub model at its configured revision into resources/models/{family}/{variant}."""

from script_setup import setup

log = setup(snakemake, network=True)

from canopy.sources.hub import SOURCE  # noqa: E402

key = f"families.{snakemake.wildcards.model.replace('/', '.')}"
record = SOURCE.make(snakemake.params.spec, snakemake.output[0], config_key=key)
log.info("fetched %s@%s (commit %s)", record.repo_id, record.revision, record.commit)
