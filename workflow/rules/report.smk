# Stage 8: the headline table and the Snakemake report (`snakemake --report results/report.html`).


report: "../report/workflow.rst"


rule headline:
    input:
        slopes=expand(
            "results/stats/{sampling}/{embedder}/glmm/slopes.tsv",
            sampling=SAMPLINGS,
            embedder=EMBEDDERS,
        ),
        panels=expand(
            "results/panel/{sampling}/{embedder}.parquet",
            sampling=SAMPLINGS,
            embedder=EMBEDDERS,
        ),
    output:
        report(
            "results/headline.tsv",
            caption="../report/headline.rst",
            category="Headline",
        ),
    log:
        "logs/headline.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        combinations=[(s, e) for s in SAMPLINGS for e in EMBEDDERS],
    script:
        "../scripts/headline.py"


rule ablation_summary:
    input:
        slopes=expand(
            "results/stats/{sampling}/{embedder}/glmm/slopes.tsv",
            sampling=SAMPLINGS,
            embedder=EMBEDDERS,
        ),
        panels=expand(
            "results/panel/{sampling}/{embedder}.parquet",
            sampling=SAMPLINGS,
            embedder=EMBEDDERS,
        ),
    output:
        report(
            "results/ablation/summary.tsv",
            caption="../report/ablation.rst",
            category="Ablations",
        ),
    log:
        "logs/ablation_summary.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        combinations=[(s, e) for s in SAMPLINGS for e in EMBEDDERS],
        bootstrap=config["metrics"]["bootstrap"],
    script:
        "../scripts/ablation_summary.py"
