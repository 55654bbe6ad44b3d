"""Download a hub model at its pinned revision into resources/models/{family}/{variant}."""

import os

from script_setup import setup

log = setup(snakemake)
# This is the one job that may reach the hub: undo the offline default set for every other job.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)

from canopy.hub import download_model  # noqa: E402

spec = snakemake.params.spec
download_model(spec["id"], spec["revision"], snakemake.output[0])
log.info("downloaded %s@%s", spec["id"], spec["revision"])
