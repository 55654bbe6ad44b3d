# Stage 1: prompt sets, and the offline training corpus of the embedded default's model pairs.


rule prepare_prompts:
    output:
        "resources/prompts/{task}.jsonl",
    params:
        spec=lambda wildcards: config["tasks"][wildcards.task],
        seed=config["seed"],
    log:
        "logs/prompts/{task}.log",
    conda:
        "../../envs/data.yaml"
    localrule: True
    script:
        "../scripts/prepare_prompts.py"


rule build_corpus:
    output:
        pretrain="resources/corpus/pretrain.jsonl",
        sft="resources/corpus/sft.jsonl",
    params:
        settings=config["training"]["corpus"],
    log:
        "logs/corpus.log",
    conda:
        "../../envs/data.yaml"
    localrule: True
    script:
        "../scripts/build_corpus.py"
