"""Convert a GGUF checkpoint (a file, or a package's) into resources/models/{family}/{variant}."""

from script_setup import setup

log = setup(snakemake)

from canopy.checkpoints import convert_gguf, locate_gguf  # noqa: E402

spec = snakemake.params.spec
key = f"families.{snakemake.wildcards.gguf_model.replace('/', '.')}"
found = locate_gguf(spec["gguf"], config_key=key, sha256=spec.get("sha256"))
log.info("converting %s (%d part(s), %.0f MB)", found.name, len(found.parts), found.size / 1e6)
record = convert_gguf(found, snakemake.output[0], dtype=spec.get("dtype"), config_key=key)
log.info(
    "wrote a %s %s model (sha256 %s, from %s)",
    record["dtype"],
    record["model_class"],
    record["sha256"],
    f"{record['package']} {record['version']}" if record["package"] else record["file"],
)
