"""Fine-tune a family's base model (hub, local or GGUF) here, as its recipe says."""

from script_setup import setup

log = setup(snakemake)

from canopy.config.models import FinetuneRecipe  # noqa: E402
from canopy.training.corpus import read_pairs  # noqa: E402
from canopy.training.sft import finetune_from_base  # noqa: E402

recipe = FinetuneRecipe.from_config(snakemake.params.recipe)
finetune_from_base(
    snakemake.input.base,
    read_pairs(snakemake.input.pairs),
    recipe,
    snakemake.output[0],
    threads=snakemake.threads,
    logger=log,
)
