# Stage 3: rollouts with the exact entropy of every sampling step.
# A killed job loses nothing: finished prompts stay in `{task}.shards/` (not a declared output, so
# Snakemake keeps it) and the rerun resumes from there. A sampling point with `chunks: K` splits
# each task's prompts into K jobs (`{task}.chunks/{chunk}-of-{K}.parquet`, each resumable and each
# on its own GPU), gathered into the same `{task}.parquet` an unchunked run writes. K is in the
# name so that after a change of K the new jobs can take the finished prompts from the old files.


rule sample_rollouts:
    input:
        model=model_dir,
        prompts="resources/prompts/{task}.jsonl",
    output:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
    log:
        "logs/rollouts/{sampling}/{family}/{variant}/{task}.log",
    wildcard_constraints:
        sampling=_one_of(UNCHUNKED_POINTS),
    conda:
        "../../envs/torch.yaml"
    # One thread: these models are too small for a second thread to help, and on a CPU-only
    # machine two one-thread jobs at once finish sooner than two two-thread jobs in turn.
    threads: 1
    resources:
        gpu=sampling_gpus,
        max_batch_rows=config_value("sampling.{sampling}.max_batch_rows"),
        max_batch_tokens=config_value("sampling.{sampling}.max_batch_tokens"),
    params:
        settings=sampling_params,
        chat=chat_params,
        framing=framing_params,
        chunk=None,
    script:
        "../scripts/sample_rollouts.py"


rule sample_rollouts_chunk:
    input:
        model=model_dir,
        prompts="resources/prompts/{task}.jsonl",
    output:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.chunks/{chunk}-of-{chunks}.parquet",
    log:
        "logs/rollouts/{sampling}/{family}/{variant}/{task}.chunks/{chunk}-of-{chunks}.log",
    wildcard_constraints:
        sampling=_one_of(CHUNKED_POINTS),
        chunk=r"\d+",
        chunks=r"\d+",
    conda:
        "../../envs/torch.yaml"
    # One thread: these models are too small for a second thread to help, and on a CPU-only
    # machine two one-thread jobs at once finish sooner than two two-thread jobs in turn.
    threads: 1
    resources:
        gpu=sampling_gpus,
        max_batch_rows=config_value("sampling.{sampling}.max_batch_rows"),
        max_batch_tokens=config_value("sampling.{sampling}.max_batch_tokens"),
    params:
        settings=sampling_params,
        chat=chat_params,
        framing=framing_params,
        chunk=lambda wildcards: int(wildcards.chunk),
    script:
        "../scripts/sample_rollouts.py"


rule gather_rollouts:
    input:
        chunks=lambda wildcards: expand(
            "results/rollouts/{{sampling}}/{{family}}/{{variant}}/{{task}}.chunks/{chunk}-of-{chunks}.parquet",
            chunk=range(config["sampling"][wildcards.sampling]["chunks"]),
            chunks=config["sampling"][wildcards.sampling]["chunks"],
        ),
        prompts="resources/prompts/{task}.jsonl",
    output:
        "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
    log:
        "logs/rollouts/{sampling}/{family}/{variant}/{task}.gather.log",
    wildcard_constraints:
        sampling=_one_of(CHUNKED_POINTS),
    localrule: True
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/gather_rollouts.py"
