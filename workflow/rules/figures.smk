# Stage 7: the paper's figures, one rule and one script per figure.
#
# Rerun triggers: each figure's settings block `figures.<name>` is a param of its rule only, so
# editing one figure's settings redraws only that figure. Library code is no input (the policy in
# common.smk): after editing src/canopy/figures/, redraw with `--forcerun figure_<name>`.


rule figure_decomposition:
    input:
        metrics=figure_inputs(
            "decomposition",
            "results/metrics/{sampling}/{family}/{variant}/{task}.parquet",
        ),
    output:
        pdf=report(
            "results/figures/{sampling}/decomposition.pdf",
            caption="../report/figures/decomposition.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
        png=report(
            "results/figures/{sampling}/decomposition.png",
            caption="../report/figures/decomposition.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
    log:
        "logs/figures/{sampling}/decomposition.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.decomposition"),
        matrix=figure_matrix("decomposition"),
    script:
        "../scripts/plot_decomposition.py"


rule figure_trajectory:
    input:
        trajectories=figure_inputs(
            "trajectory",
            "results/metrics/{sampling}/{family}/{variant}/{task}.trajectory.parquet",
        ),
    output:
        pdf=report(
            "results/figures/{sampling}/trajectory.pdf",
            caption="../report/figures/trajectory.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
        png=report(
            "results/figures/{sampling}/trajectory.png",
            caption="../report/figures/trajectory.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
    log:
        "logs/figures/{sampling}/trajectory.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.trajectory"),
        matrix=figure_matrix("trajectory"),
    script:
        "../scripts/plot_trajectory.py"


rule figure_lengths:
    input:
        rollouts=figure_inputs(
            "lengths", "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet"
        ),
    output:
        pdf=report(
            "results/figures/{sampling}/lengths.pdf",
            caption="../report/figures/lengths.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
        png=report(
            "results/figures/{sampling}/lengths.png",
            caption="../report/figures/lengths.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
    log:
        "logs/figures/{sampling}/lengths.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.lengths"),
        matrix=figure_matrix("lengths"),
        # The cap drawn on the figure is the one the rollouts were sampled with.
        max_new_tokens=config_provider(
            "sampling.{point}.max_new_tokens",
            point=lambda wildcards: sampled_point(wildcards.sampling),
        ),
    script:
        "../scripts/plot_lengths.py"


rule figure_variance:
    input:
        rollouts=figure_inputs(
            "variance", "results/rollouts/{sampling}/{family}/{variant}/{task}.parquet"
        ),
    output:
        pdf=report(
            "results/figures/{sampling}/variance.pdf",
            caption="../report/figures/variance.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
        png=report(
            "results/figures/{sampling}/variance.png",
            caption="../report/figures/variance.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
    log:
        "logs/figures/{sampling}/variance.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.variance"),
        matrix=figure_matrix("variance"),
    script:
        "../scripts/plot_variance.py"


rule figure_slopes:
    input:
        slopes="results/stats/{sampling}/{embedder}/glmm/slopes.tsv",
        # The scatter of D vs R is drawn from the panel; without it the panel is not needed.
        panel=(
            "results/panel/{sampling}/{embedder}.parquet"
            if config["figures"]["slopes"]["show_scatter"]
            else []
        ),
    output:
        pdf=report(
            "results/figures/{sampling}/{embedder}/slopes.pdf",
            caption="../report/figures/slopes.rst",
            category="Figures",
            subcategory="{sampling} / {embedder}",
        ),
        png=report(
            "results/figures/{sampling}/{embedder}/slopes.png",
            caption="../report/figures/slopes.rst",
            category="Figures",
            subcategory="{sampling} / {embedder}",
        ),
    log:
        "logs/figures/{sampling}/{embedder}/slopes.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.slopes"),
    script:
        "../scripts/plot_slopes.py"


rule figure_residuals:
    input:
        residuals="results/stats/{sampling}/{embedder}/diagnostics/residuals.tsv",
        tests="results/stats/{sampling}/{embedder}/diagnostics/tests.json",
    output:
        pdf=report(
            "results/figures/{sampling}/{embedder}/residuals.pdf",
            caption="../report/figures/residuals.rst",
            category="Figures",
            subcategory="{sampling} / {embedder}",
        ),
        png=report(
            "results/figures/{sampling}/{embedder}/residuals.png",
            caption="../report/figures/residuals.rst",
            category="Figures",
            subcategory="{sampling} / {embedder}",
        ),
    log:
        "logs/figures/{sampling}/{embedder}/residuals.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.residuals"),
    script:
        "../scripts/plot_residuals.py"


rule figure_rho:
    input:
        metrics=figure_inputs("rho", "results/metrics/{sampling}/{family}/{variant}/{task}.parquet"),
    output:
        pdf=report(
            "results/figures/{sampling}/rho.pdf",
            caption="../report/figures/rho.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
        png=report(
            "results/figures/{sampling}/rho.png",
            caption="../report/figures/rho.rst",
            category="Figures",
            subcategory="{sampling}",
        ),
    log:
        "logs/figures/{sampling}/rho.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.rho"),
        matrix=figure_matrix("rho"),
    script:
        "../scripts/plot_rho.py"


rule figure_forest:
    input:
        table="results/ablation/summary.tsv",
    output:
        pdf=report(
            "results/figures/ablation_forest.pdf",
            caption="../report/figures/forest.rst",
            category="Ablations",
        ),
        png=report(
            "results/figures/ablation_forest.png",
            caption="../report/figures/forest.rst",
            category="Ablations",
        ),
    log:
        "logs/figures/ablation_forest.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.forest"),
    script:
        "../scripts/plot_forest.py"


# Drawn only when the power planner runs (rule power, make plan-power): no default target.
rule figure_power:
    input:
        table="results/stats/{sampling}/{embedder}/power.tsv",
    output:
        pdf=report(
            "results/figures/{sampling}/{embedder}/power.pdf",
            caption="../report/figures/power.rst",
            category="Power",
        ),
        png=report(
            "results/figures/{sampling}/{embedder}/power.png",
            caption="../report/figures/power.rst",
            category="Power",
        ),
    log:
        "logs/figures/{sampling}/{embedder}/power.log",
    localrule: True
    conda:
        "../../envs/figures.yaml"
    params:
        settings=config_provider("figures.power"),
    script:
        "../scripts/plot_power.py"
