# Stage 5: semantic diversity of each prompt's rollouts. Embeddings are cached per model and task
# (one file per task, written by one job per model), so a change to a diversity setting
# recomputes the scores without re-embedding.


rule embed_rollouts:
    # One job per model embeds all its tasks: loading sentence-transformers takes several seconds
    # per process, more than embedding a small task's rollouts. The output is the model's folder
    # of <task>.npz files, one per task the (sampling point, embedder) pair is analysed on.
    input:
        rollouts=lambda wildcards: expand(
            "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
            sampling=wildcards.sampling,
            family=wildcards.family,
            variant=wildcards.variant,
            task=combination_tasks(wildcards.sampling, wildcards.embedder),
        ),
        embedder=embedder_dir,
    output:
        directory("results/embeddings/{sampling}/{embedder}/{family}/{variant}"),
    log:
        "logs/embeddings/{sampling}/{embedder}/{family}/{variant}.log",
    conda:
        "../../envs/torch.yaml"
    # One thread, like sampling: on a CPU-only machine two jobs at once beat one job on two.
    threads: 1
    resources:
        gpu=lambda wildcards: device_gpus(config["embedders"][wildcards.embedder]["device"]),
    params:
        settings=config_provider("embedders.{embedder}"),
    script:
        "../scripts/embed_rollouts.py"


rule diversity:
    input:
        embeddings="results/embeddings/{sampling}/{embedder}/{family}/{variant}",
        rollouts="results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
    output:
        "results/diversity/{sampling}/{embedder}/{family}/{variant}/{task}.parquet",
    log:
        "logs/diversity/{sampling}/{embedder}/{family}/{variant}/{task}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        settings=config_provider("diversity", "distinct_n", "vendi_orders"),
    script:
        "../scripts/diversity.py"


rule semantic_entropy:
    input:
        rollouts="results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
        nli_model=classifier_dir("nli"),
    output:
        "results/semantic_entropy/{sampling}/{family}/{variant}/{task}.parquet",
    log:
        "logs/semantic_entropy/{sampling}/{family}/{variant}/{task}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda wildcards: device_gpus(
            (config["diversity"]["semantic_entropy"] or {}).get("device", "auto")
        ),
    params:
        settings=config_provider("diversity.semantic_entropy"),
    script:
        "../scripts/semantic_entropy.py"
