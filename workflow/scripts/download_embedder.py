"""Fetch a hub sentence embedder at its configured revision into resources/embedders/{embedder}."""

from script_setup import setup

log = setup(snakemake, network=True)

from canopy.hub import download_embedder  # noqa: E402

spec = snakemake.params.spec
record = download_embedder(
    spec["model"],
    spec["revision"],
    snakemake.output[0],
    config_key=f"embedders.{snakemake.wildcards.embedder}",
)
log.info("fetched %s@%s (commit %s)", record.repo_id, record.revision, record.commit)
