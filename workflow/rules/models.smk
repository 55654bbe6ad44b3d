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
        family=_one_of(TRAINED_FAMILIES),
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


rule finetune_model:
    input:
        base="resources/models/{family}/base",
        pairs="resources/corpus/sft.jsonl",
    output:
        directory("resources/models/{family}/finetuned"),
    log:
        "logs/models/{family}/finetuned.log",
    wildcard_constraints:
        family=_one_of(TRAINED_FAMILIES),
    # Every job of a fine-tuned model waits for this one: run it before ready jobs of other kinds
    # (the base models' sampling would otherwise take the cores first and delay it).
    priority: 10
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        recipe=config_provider("training.recipes.{recipe}", recipe=recipe_name("finetuned")),
    script:
        "../scripts/finetune_model.py"


rule finetune_from_base:
    input:
        base=lambda wildcards: model_path(wildcards.family, "base"),
        pairs="resources/corpus/sft.jsonl",
    output:
        directory("resources/models/{family}/finetuned"),
    log:
        "logs/models/{family}/finetuned.log",
    wildcard_constraints:
        family=_one_of(FINETUNED_HERE),
    priority: 10
    conda:
        "../../envs/torch.yaml"
    # A real base is large enough for both cores to pay, and its fine-tune is what every job of
    # the fine-tuned variant waits for.
    threads: 2
    resources:
        gpu=lambda wildcards: device_gpus(
            config["training"]["finetunes"][recipe_name("finetuned")(wildcards)]["device"]
        ),
    params:
        recipe=config_provider("training.finetunes.{recipe}", recipe=recipe_name("finetuned")),
    script:
        "../scripts/finetune_from_base.py"


rule download_model:
    output:
        directory("resources/models/{family}/{variant}"),
    log:
        "logs/models/{family}/{variant}.download.log",
    wildcard_constraints:
        family=_one_of(HUB_FAMILIES),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        spec=config_provider("families.{family}.{variant}", "id", "revision"),
    script:
        "../scripts/download_model.py"


# A family may pair a GGUF variant with a hub one: the GGUF one is converted, not downloaded;
# a hub base's fine-tune made here is trained, not downloaded.
ruleorder: convert_gguf > finetune_from_base > download_model


rule convert_gguf:
    output:
        directory("resources/models/{gguf_model}"),
    log:
        "logs/models/{gguf_model}.convert.log",
    wildcard_constraints:
        gguf_model=_one_of(GGUF_MODELS),
    conda:
        "../../envs/torch.yaml"
    params:
        spec=gguf_params,
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
