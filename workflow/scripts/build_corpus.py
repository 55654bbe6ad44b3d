"""Generate the offline pre-training corpus and the instruction pairs of the default's models."""

from script_setup import setup

log = setup(snakemake)

from canopy.training.corpus import CorpusSettings, write_corpus  # noqa: E402

settings = CorpusSettings.from_config(snakemake.params.settings)
write_corpus(settings, pretrain_path=snakemake.output.pretrain, sft_path=snakemake.output.sft)
log.info("corpus written: %s", settings)
