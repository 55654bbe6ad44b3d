"""DHARMa-style simulation residuals and tests of the fitted Beta mixed model."""

from pathlib import Path

from script_setup import setup

log = setup(snakemake)

from canopy.stats import StatsSettings, diagnose  # noqa: E402

settings = StatsSettings.from_config(snakemake.params.settings)
result = diagnose(
    Path(snakemake.input.model).parent, settings, Path(snakemake.output.tests_json).parent
)
log.info("%s", result)
