# Stage 9: provenance. The lock file names the commit of every model, prompt set and embedder the
# run used, and the software versions; check_hub_revisions asks the hub whether a fetched branch
# has moved since (run it by name: `snakemake --cores 1 check_hub_revisions`).


rule lock:
    input:
        models=model_dirs,
        prompts=expand("resources/prompts/{task}.source.json", task=TASKS),
        embedders=embedder_dirs,
        classifiers=expand("resources/classifiers/{name}", name=list(HUB_CLASSIFIERS)),
        glmm=combination_paths("results/stats/{sampling}/{embedder}/glmm/summary.json"),
    output:
        lock="results/provenance/lock.yaml",
        table=report(
            "results/provenance/lock.tsv",
            caption="../report/lock.rst",
            category="Provenance",
        ),
    log:
        "logs/provenance/lock.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    params:
        families=config_provider("families"),
        embedders=config_provider("embedders"),
        classifiers=list(HUB_CLASSIFIERS),
    script:
        "../scripts/write_lock.py"


rule check_hub_revisions:
    input:
        fetched=[
            model_path(f, v) for f in FAMILIES for v in VARIANTS if model_source(f, v) == "hub"
        ]
        + expand("resources/embedders/{embedder}", embedder=HUB_EMBEDDERS)
        + expand("resources/classifiers/{name}", name=list(HUB_CLASSIFIERS)),
        prompts=expand("resources/prompts/{task}.source.json", task=HUB_TASKS),
    log:
        "logs/provenance/check_hub_revisions.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/check_hub_revisions.py"
