# Stage 4: Canopy Entropy and the other per-prompt metrics (docs/architecture.md).


rule prompt_metrics:
    input:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
    output:
        metrics="results/metrics/{sampling}/{family}/{variant}/{task}.parquet",
        trajectory="results/metrics/{sampling}/{family}/{variant}/{task}.trajectory.parquet",
    log:
        "logs/metrics/{sampling}/{family}/{variant}/{task}.log",
    conda:
        "../../envs/analysis.yaml"
    params:
        settings=config_provider(
            "metrics",
            "truncated",
            "truncation_warning",
            "confidence",
            "length_entropy",
        ),
    script:
        "../scripts/prompt_metrics.py"
