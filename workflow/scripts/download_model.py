"""Fetch a hub model at its configured revision into resources/models/{family}/{variant}."""

from script_setup import setup

log = setup(snakemake, network=True)

from canopy.hub import download_model  # noqa: E402

spec = snakemake.params.spec
family, variant = snakemake.wildcards.family, snakemake.wildcards.variant
record = download_model(
    spec["id"], spec["revision"], snakemake.output[0], config_key=f"families.{family}.{variant}"
)
log.info("fetched %s@%s (commit %s)", record.repo_id, record.revision, record.commit)
