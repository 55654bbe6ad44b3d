# Stage 6: the panel, the Beta mixed-effects regression, its diagnostics and robustness checks.


rule panel:
    input:
        metrics=matrix_paths(
            "results/metrics/{sampling}/{family}/{variant}/{task}.parquet",
            combination_matrix,
        ),
        diversity=matrix_paths(
            "results/diversity/{sampling}/{embedder}/{family}/{variant}/{task}.parquet",
            combination_matrix,
        ),
        semantic=semantic_entropy_paths(),
    output:
        "results/panel/{sampling}/{embedder}.parquet",
    log:
        "logs/panel/{sampling}/{embedder}.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        matrix=combination_matrix,
    script:
        "../scripts/build_panel.py"


rule fit_glmm:
    input:
        "results/panel/{sampling}/{embedder}.parquet",
    output:
        coefficients=report(
            "results/stats/{sampling}/{embedder}/glmm/coefficients.tsv",
            caption="../report/glmm_coefficients.rst",
            category="Regression",
        ),
        slopes=report(
            "results/stats/{sampling}/{embedder}/glmm/slopes.tsv",
            caption="../report/glmm_slopes.rst",
            category="Regression",
        ),
        variance="results/stats/{sampling}/{embedder}/glmm/variance_components.tsv",
        convergence="results/stats/{sampling}/{embedder}/glmm/convergence.json",
        summary="results/stats/{sampling}/{embedder}/glmm/summary.json",
        model="results/stats/{sampling}/{embedder}/glmm/model.rds",
    log:
        "logs/stats/{sampling}/{embedder}/glmm.log",
    conda:
        "../../envs/stats.yaml"
    # One R process on one core (glmmTMB fits serially here): a second thread would only keep
    # another job off the other core.
    threads: 1
    params:
        settings=config_provider(
            "stats",
            "formula",
            "dispersion",
            "reference_variant",
            "reference_task",
            "clip",
            "bootstrap",
            "confidence",
            "seed",
            "rscript",
        ),
    script:
        "../scripts/fit_glmm.py"


rule glmm_diagnostics:
    input:
        model="results/stats/{sampling}/{embedder}/glmm/model.rds",
        summary="results/stats/{sampling}/{embedder}/glmm/summary.json",
    output:
        residuals="results/stats/{sampling}/{embedder}/diagnostics/residuals.tsv",
        tests=report(
            "results/stats/{sampling}/{embedder}/diagnostics/tests.tsv",
            caption="../report/diagnostics_tests.rst",
            category="Regression",
        ),
        tests_json="results/stats/{sampling}/{embedder}/diagnostics/tests.json",
    log:
        "logs/stats/{sampling}/{embedder}/diagnostics.log",
    conda:
        "../../envs/stats.yaml"
    # One R process on one core (glmmTMB fits serially here): a second thread would only keep
    # another job off the other core.
    threads: 1
    params:
        settings=config_provider(
            "stats",
            "simulations",
            "seed",
            "rscript",
            "use_dharma",
        ),
    script:
        "../scripts/glmm_diagnostics.py"


rule robustness_lmm:
    input:
        "results/panel/{sampling}/{embedder}.parquet",
    output:
        report(
            "results/stats/{sampling}/{embedder}/robustness/lmm.tsv",
            caption="../report/robustness.rst",
            category="Robustness",
        ),
    log:
        "logs/stats/{sampling}/{embedder}/robustness_lmm.log",
    conda:
        "../../envs/stats.yaml"
    params:
        settings=config_provider(
            "stats",
            "formula",
            "dispersion",
            "reference_variant",
            "reference_task",
            "clip",
            "confidence",
        ),
    script:
        "../scripts/robustness_lmm.py"


rule robustness_fixed_effects:
    input:
        "results/panel/{sampling}/{embedder}.parquet",
    output:
        report(
            "results/stats/{sampling}/{embedder}/robustness/fixed_effects.tsv",
            caption="../report/robustness.rst",
            category="Robustness",
        ),
    log:
        "logs/stats/{sampling}/{embedder}/robustness_fixed_effects.log",
    conda:
        "../../envs/stats.yaml"
    params:
        settings=config_provider(
            "stats",
            "formula",
            "dispersion",
            "reference_variant",
            "reference_task",
            "clip",
            "confidence",
            "robustness.fixed_effects_formula",
            "robustness.cluster",
        ),
    script:
        "../scripts/robustness_fixed_effects.py"


rule robustness_length_matched:
    input:
        rollouts=matrix_paths(
            "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet",
            combination_matrix,
        ),
        # Each model's embeddings directory, once per task (the script opens <task>.npz there).
        embeddings=matrix_paths(
            "results/embeddings/{sampling}/{embedder}/{family}/{variant}",
            combination_matrix,
        ),
    output:
        report(
            "results/stats/{sampling}/{embedder}/robustness/length_matched.tsv",
            caption="../report/robustness.rst",
            category="Robustness",
        ),
    log:
        "logs/stats/{sampling}/{embedder}/robustness_length_matched.log",
    conda:
        "../../envs/stats.yaml"
    # One R process on one core (glmmTMB fits serially here): a second thread would only keep
    # another job off the other core.
    threads: 1
    params:
        matrix=combination_matrix,
        settings=config_provider(
            "stats",
            "formula",
            "dispersion",
            "reference_variant",
            "reference_task",
            "clip",
            "bootstrap",
            "confidence",
            "seed",
            "rscript",
            "robustness.length_bins",
            "robustness.length_repeats",
            "robustness.min_matched",
        ),
    script:
        "../scripts/robustness_length_matched.py"


rule paired_bootstrap:
    input:
        "results/panel/{sampling}/{embedder}.parquet",
    output:
        report(
            "results/stats/{sampling}/{embedder}/paired_bootstrap.tsv",
            caption="../report/paired_bootstrap.rst",
            category="Paired comparisons",
        ),
    log:
        "logs/stats/{sampling}/{embedder}/paired_bootstrap.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        settings=config_provider("metrics.bootstrap"),
    script:
        "../scripts/paired_bootstrap.py"


# The power planner: no default target (its refits take minutes); `snakemake power` runs it for
# the main setting, `make plan-power` for the Gemma run.
rule plan_power:
    input:
        panel="results/panel/{sampling}/{embedder}.parquet",
        model="results/stats/{sampling}/{embedder}/glmm/model.rds",
        summary="results/stats/{sampling}/{embedder}/glmm/summary.json",
    output:
        power=report(
            "results/stats/{sampling}/{embedder}/power.tsv",
            caption="../report/power.rst",
            category="Power",
        ),
        simulations="results/stats/{sampling}/{embedder}/power_simulations.tsv",
    log:
        "logs/stats/{sampling}/{embedder}/power.log",
    conda:
        "../../envs/stats.yaml"
    # One R process per thread, side by side: the simulated panels are independent, and each
    # is seeded by itself, so the thread count never changes a number. Two fit a laptop (the
    # Slurm profile gives 16; `--set-threads plan_power=N` elsewhere); `workflow.cores` would
    # make the workflow unreadable without --cores (a lint, a dry run from a test).
    threads: 2
    params:
        settings=config_provider(
            "stats",
            "formula",
            "dispersion",
            "reference_variant",
            "reference_task",
            "clip",
            "bootstrap",
            "confidence",
            "seed",
            "rscript",
            "power",
        ),
    script:
        "../scripts/plan_power.py"


rule power:
    input:
        combination_paths("results/stats/{sampling}/{embedder}/power.tsv", [MAIN_COMBINATION]),
        combination_paths("results/figures/{sampling}/{embedder}/power.pdf", [MAIN_COMBINATION]),
    localrule: True
