# Stage 2: model pairs and embedders. Families with `source: train` are pre-trained and fine-tuned
# here (the offline default); `source: hub` models and hub embedders are fetched once into
# resources/ (the only jobs besides prepare_prompts of a hub task that reach the network);
# `source: gguf` files are converted once into transformers directories there; `source: local`
# directories are used where they are; a `source: finetune` variant is fine-tuned here from its
# family's base, whatever that base's source.


rule pretrain_base_model:
    input:
        corpus="resources/corpus/pretrain.jsonl",
    output:
        directory("resources/models/{family}/base"),
    log:
        "logs/models/{family}/base.log",
    wildcard_constraints:
        family=made_by("pretrain_base_model", "base"),
    conda:
        "../../envs/torch.yaml"
    # One thread: the default's models are too small for a second one to pay (its matrices are
    # tiny, and on a busy machine the threads' synchronisation made a step 4x slower), and two
    # families then train side by side on two cores.
    threads: 1
    params:
        recipe=config_provider("training.recipes.{recipe}", recipe=recipe_name("base")),
    script:
        "../scripts/pretrain_base_model.py"


# The one fine-tune rule: a trained family's fine-tune (its recipe's sft_* keys) and a
# `source: finetune` variant (training.finetunes) are both made from the base's directory.
rule finetune_model:
    input:
        base=lambda wildcards: model_path(wildcards.family, "base"),
        pairs="resources/corpus/sft.jsonl",
    output:
        directory("resources/models/{family}/finetuned"),
    log:
        "logs/models/{family}/finetuned.log",
    wildcard_constraints:
        family=made_by("finetune_model", "finetuned"),
    # Every job of a fine-tuned model waits for this one: run it before ready jobs of other kinds
    # (the base models' sampling would otherwise take the cores first and delay it).
    priority: 10
    conda:
        "../../envs/torch.yaml"
    # A trained family's model is too small for a second thread to pay (as in pretraining), and
    # its fine-tune's bits are those of one thread; a real base pays for both cores.
    threads: lambda wildcards: 1 if wildcards.family in TRAINED_FAMILIES else 2
    resources:
        gpu=lambda wildcards: (
            0
            if wildcards.family in TRAINED_FAMILIES
            else device_gpus(
                config["training"]["finetunes"][recipe_name("finetuned")(wildcards)]["device"]
            )
        ),
    params:
        source=config_provider("families.{family}.finetuned.source"),
        # The recipe the variant names, in its source's table (each spelt out, so that a config
        # error in either names this rule).
        recipe=lambda wildcards: {
            "train": config_provider("training.recipes.{r}", r=recipe_name("finetuned")),
            "finetune": config_provider("training.finetunes.{r}", r=recipe_name("finetuned")),
        }[model_source(wildcards.family, "finetuned")](wildcards),
    script:
        "../scripts/finetune_model.py"


# The rules that make model directories each accept exactly the models whose source names them
# (made_by, from canopy.sources' registry): one rule matches each directory, whichever sources a
# family mixes (a GGUF base with a hub fine-tune, a hub base fine-tuned here).


rule download_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/models/{model}.download.log",
    wildcard_constraints:
        model=made_by("download_model"),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        spec=source_params("hub"),
    script:
        "../scripts/download_model.py"


rule convert_gguf:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/models/{model}.convert.log",
    wildcard_constraints:
        model=made_by("convert_gguf"),
    conda:
        "../../envs/torch.yaml"
    params:
        spec=source_params("gguf"),
    script:
        "../scripts/convert_gguf.py"


rule download_embedder:
    output:
        directory("resources/embedders/{embedder}"),
    log:
        "logs/embedders/{embedder}.download.log",
    wildcard_constraints:
        embedder=_one_of(HUB_EMBEDDERS),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        spec=config_provider("embedders.{embedder}", "model", "revision"),
    script:
        "../scripts/download_embedder.py"


rule download_classifier:
    output:
        directory("resources/classifiers/{classifier}"),
    log:
        "logs/classifiers/{classifier}.download.log",
    wildcard_constraints:
        classifier=_one_of(HUB_CLASSIFIERS),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        spec=lambda wildcards: HUB_CLASSIFIERS[wildcards.classifier][0],
        config_key=lambda wildcards: HUB_CLASSIFIERS[wildcards.classifier][1],
    script:
        "../scripts/download_classifier.py"
