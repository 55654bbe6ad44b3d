"""Fine-tune a family's base model here, whatever its source, on the corpus' instruction pairs:
a trained family's by the fine-tune its recipe derives, any other's by its training.finetunes recipe."""

from script_setup import setup

log = setup(snakemake)

from canopy.config.models import FinetuneRecipe, Recipe  # noqa: E402
from canopy.training.corpus import read_pairs  # noqa: E402
from canopy.training.sft import finetune  # noqa: E402

# The table the family's recipe is read from: training.recipes for `source: train`,
# training.finetunes for `source: finetune`.
RECIPES = {"train": Recipe, "finetune": FinetuneRecipe}

recipe = RECIPES[snakemake.params.source].from_config(snakemake.params.recipe)
finetune(
    snakemake.input.base,
    read_pairs(snakemake.input.pairs),
    recipe,
    snakemake.output[0],
    threads=snakemake.threads,
    logger=log,
)
