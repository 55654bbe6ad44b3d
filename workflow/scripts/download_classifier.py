"""Fetch a hub sequence classifier (a reward or NLI model) into resources/classifiers/{name}."""

from script_setup import setup

log = setup(snakemake, network=True)

from canopy.hub import download_model  # noqa: E402

spec = snakemake.params.spec
record = download_model(
    spec["model"], spec["revision"], snakemake.output[0], config_key=snakemake.params.config_key
)
log.info("fetched %s@%s (commit %s)", record.repo_id, record.revision, record.commit)
