# Stage 3b: rollout filters. A sampling entry with a `filter` block is made from the rollouts of
# another entry: a reward model scores them and each prompt's best share is kept, as a rollout
# table of its own, so every later stage treats the filter as one more sampling setting.


ruleorder: filter_rollouts > sample_rollouts


rule filter_rollouts:
    input:
        rollouts=lambda wildcards: (
            f"results/rollouts/{sampled_point(wildcards.sampling)}/"
            f"{wildcards.family}/{wildcards.variant}/{wildcards.task}.parquet"
        ),
        prompts="resources/prompts/{task}.jsonl",
        reward_model=classifier_dir("reward-{sampling}"),
    output:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
        scores="results/rewards/{sampling}/{family}/{variant}/{task}.parquet",
    log:
        "logs/rewards/{sampling}/{family}/{variant}/{task}.log",
    wildcard_constraints:
        sampling=_one_of(FILTERED_SAMPLINGS),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        gpu=lambda wildcards: device_gpus(
            config["sampling"][wildcards.sampling]["filter"]["device"]
        ),
    params:
        settings=config_provider("sampling.{sampling}.filter"),
    script:
        "../scripts/filter_rollouts.py"
