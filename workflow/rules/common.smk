# Shared helpers: configuration validation, the experiment matrix, and input functions.

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from snakemake.exceptions import WorkflowError

from canopy.config import ConfigError, check_references, validate_config

CONFIG_CONSUMERS = {
    "seed": ["prepare_prompts"],
    "tasks": ["prepare_prompts"],
    "families": [
        "pretrain_base_model",
        "finetune_model",
        "download_model",
        "sample_rollouts",
    ],
    "training": ["build_corpus", "pretrain_base_model", "finetune_model"],
    "sampling": ["sample_rollouts"],
    "metrics": ["prompt_metrics", "paired_bootstrap"],
    "embedders": ["embed_rollouts"],
    "diversity": ["diversity"],
    "stats": [
        "fit_glmm",
        "glmm_diagnostics",
        "robustness_lmm",
        "robustness_fixed_effects",
        "robustness_length_matched",
    ],
    "figures": ["figure_{name}"],
}

try:
    config.update(
        validate_config(
            config,
            Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
            CONFIG_CONSUMERS,
        )
    )
    check_references(config)
except ConfigError as error:
    raise WorkflowError(
        f"{error}\nFix these keys in your config file (see config.yaml for a valid example)."
    )


VARIANTS = ["base", "finetuned"]
FAMILIES = list(config["families"])
TASKS = list(config["tasks"])
SAMPLINGS = list(config["sampling"])
EMBEDDERS = list(config["embedders"])


def _one_of(names):
    """Regex accepting exactly the given names (none: a regex that never matches)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


def model_source(family, variant):
    return config["families"][family][variant]["source"]


TRAINED_FAMILIES = [f for f in FAMILIES if model_source(f, "base") == "train"]
HUB_FAMILIES = [f for f in FAMILIES if "hub" in {model_source(f, v) for v in VARIANTS}]


wildcard_constraints:
    family=_one_of(FAMILIES),
    variant=_one_of(VARIANTS),
    task=_one_of(TASKS),
    sampling=_one_of(SAMPLINGS),
    embedder=_one_of(EMBEDDERS),


def model_dir(wildcards):
    """The transformers directory of one model: built or downloaded under resources/, or the user's own."""
    spec = config["families"][wildcards.family][wildcards.variant]
    if spec["source"] == "local":
        return spec["path"]
    return f"resources/models/{wildcards.family}/{wildcards.variant}"


def device_gpus(device):
    """GPUs a job asks for: none when pinned to the CPU, one otherwise (CUDA is used when present)."""
    return 0 if device == "cpu" else 1


def keyed_paths(pattern, **fixed):
    """{(family, variant, task): path} for every model and task of the matrix."""
    return {
        (family, variant, task): pattern.format(
            family=family, variant=variant, task=task, **fixed
        )
        for family in FAMILIES
        for variant in VARIANTS
        for task in TASKS
    }


def analysis_targets():
    """Every statistics table of every sampling setting and embedder, and the headline table."""
    return ["results/headline.tsv"] + expand(
        [
            "results/stats/{sampling}/{embedder}/glmm/summary.json",
            "results/stats/{sampling}/{embedder}/diagnostics/tests.json",
            "results/stats/{sampling}/{embedder}/robustness/lmm.tsv",
            "results/stats/{sampling}/{embedder}/robustness/fixed_effects.tsv",
            "results/stats/{sampling}/{embedder}/robustness/length_matched.tsv",
            "results/stats/{sampling}/{embedder}/paired_bootstrap.tsv",
        ],
        sampling=SAMPLINGS,
        embedder=EMBEDDERS,
    )
