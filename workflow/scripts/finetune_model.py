"""Fine-tune a family's base model on instruction pairs rendered through its chat template."""

from script_setup import setup

log = setup(snakemake)

from canopy.training import Recipe, finetune  # noqa: E402
from canopy.training.corpus import read_pairs  # noqa: E402

recipe = Recipe.from_config(snakemake.params.recipe)
pairs = read_pairs(snakemake.input.pairs)
finetune(
    snakemake.input.base, pairs, recipe, snakemake.output[0], threads=snakemake.threads, logger=log
)
