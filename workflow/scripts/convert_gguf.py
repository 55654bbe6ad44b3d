"""Convert a GGUF checkpoint (a file, or a package's) into resources/models/{family}/{variant}."""

from script_setup import setup

log = setup(snakemake)

from canopy.sources.gguf import SOURCE  # noqa: E402

key = f"families.{snakemake.wildcards.model.replace('/', '.')}"
record = SOURCE.make(snakemake.params.spec, snakemake.output[0], config_key=key)
log.info(
    "wrote a %s %s model (sha256 %s, from %s)",
    record["dtype"],
    record["model_class"],
    record["sha256"],
    f"{record['package']} {record['version']}" if record["package"] else record["file"],
)
