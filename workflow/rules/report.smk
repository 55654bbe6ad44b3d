# Stage 8: the headline table, an example rollout of each model and task, and the Snakemake report
# (`snakemake --report results/report.html`).


# The report opens with workflow.rst rendered with this run's measurements (rule report_intro);
# before that file exists, Snakemake renders the template itself, without them.
import os

REPORT_INTRO = "results/report/workflow.rst"


_REPORT_TEXT = (
    os.path.abspath(REPORT_INTRO) if os.path.exists(REPORT_INTRO) else "../report/workflow.rst"
)


report: _REPORT_TEXT


rule headline:
    input:
        slopes=combination_paths("results/stats/{sampling}/{embedder}/glmm/slopes.tsv"),
        panels=combination_paths("results/panel/{sampling}/{embedder}.parquet"),
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
        combinations=COMBINATIONS,
    script:
        "../scripts/headline.py"


rule ablation_summary:
    input:
        slopes=combination_paths("results/stats/{sampling}/{embedder}/glmm/slopes.tsv"),
        panels=combination_paths("results/panel/{sampling}/{embedder}.parquet"),
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
        combinations=COMBINATIONS,
        bootstrap=config_provider("metrics.bootstrap"),
    script:
        "../scripts/ablation_summary.py"


rule example_rollouts:
    input:
        rollouts=expand(
            "results/rollouts/{sampling}/{matrix}.parquet",
            sampling=SAMPLINGS[0],
            matrix=["/".join(key) for key in MATRIX],
        ),
        prompts=expand("resources/prompts/{task}.jsonl", task=TASKS),
    output:
        report(
            "results/examples.tsv",
            caption="../report/examples.rst",
            category="Rollouts",
        ),
    log:
        "logs/example_rollouts.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        matrix=MATRIX,
        tasks=TASKS,
    script:
        "../scripts/example_rollouts.py"


rule report_intro:
    input:
        template=workflow.source_path("../report/workflow.rst"),
        rollouts=expand(
            "results/rollouts/{sampling}/{matrix}.parquet",
            sampling=SAMPLINGS[0],
            matrix=["/".join(key) for key in MATRIX],
        ),
        models=[model_path(f, v) for f in FAMILIES for v in VARIANTS],
    output:
        REPORT_INTRO,
    log:
        "logs/report_intro.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        # The settings the text quotes (workflow.rst), and the names it lists.
        config=config_provider(
            "", "metrics.truncation_warning", "sampling.*.max_new_tokens", "sweeps"
        ),
        families=FAMILIES,
        embedders=EMBEDDERS,
        tasks=TASKS,
        sampling=SAMPLINGS[0],
        matrix=MATRIX,
        pairs=[(f, v) for f in FAMILIES for v in VARIANTS],
        sources=[model_source(f, v) for f in FAMILIES for v in VARIANTS],
    script:
        "../scripts/report_intro.py"
