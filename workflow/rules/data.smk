# Stage 1: prompt sets, and the offline training corpus of the embedded default's model pairs.


rule prepare_prompts:
    input:
        prompt_source_files,
    output:
        prompts="resources/prompts/{task}.jsonl",
        record="resources/prompts/{task}.source.json",
    log:
        "logs/prompts/{task}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        spec=config_provider("tasks.{task}"),
        seed=config_provider("seed"),
    script:
        "../scripts/prepare_prompts.py"


rule build_corpus:
    output:
        pretrain="resources/corpus/pretrain.jsonl",
        sft="resources/corpus/sft.jsonl",
    log:
        "logs/corpus.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        settings=config_provider("training.corpus"),
    script:
        "../scripts/build_corpus.py"
