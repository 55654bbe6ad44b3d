"""Pre-train a family's base model from scratch on the offline corpus."""

from script_setup import setup

log = setup(snakemake)

from canopy.training import Recipe, pretrain_base  # noqa: E402
from canopy.training.corpus import read_documents  # noqa: E402

recipe = Recipe.from_config(snakemake.params.recipe)
documents = read_documents(snakemake.input.corpus)
pretrain_base(documents, recipe, snakemake.output[0], threads=snakemake.threads, logger=log)
