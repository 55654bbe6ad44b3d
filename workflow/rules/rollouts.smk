# Stage 3: rollouts with the exact entropy of every sampling step.
# A killed job loses nothing: finished prompts stay in `{task}.shards/` (not a declared output, so
# Snakemake keeps it) and the rerun resumes from there.


rule sample_rollouts:
    input:
        model=model_dir,
        prompts="resources/prompts/{task}.jsonl",
    output:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
    log:
        "logs/rollouts/{sampling}/{family}/{variant}/{task}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda wildcards: device_gpus(
            config["sampling"][wildcards.sampling]["device"]
        ),
    params:
        settings=lambda wildcards: config["sampling"][wildcards.sampling],
    script:
        "../scripts/sample_rollouts.py"
