# canopy-entropy: Canopy Entropy of base and fine-tuned language models.
#
# Wiring only: every rule lives in workflow/rules/<stage>.smk and every computation in src/canopy/.
# `snakemake --cores all` runs config.yaml (the offline CPU default);
# `snakemake --cores all --configfile config.yaml config/sweeps.yaml` adds its sweep points;
# `snakemake --cores all --configfile config/paper.yaml` runs the paper's experiment on GPUs.


from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# config.yaml is the default only: a config given with --configfile replaces it rather than being
# merged into it, so config/paper.yaml never inherits the default's small model families.
if not workflow.config_settings.configfiles:

    configfile: Path(workflow.basedir) / "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/rollouts.smk"
include: "workflow/rules/filters.smk"
include: "workflow/rules/entropy.smk"
include: "workflow/rules/diversity.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/provenance.smk"


rule all:
    default_target: True
    input:
        analysis_targets(),
        figure_targets(),
        "results/provenance/lock.yaml",
        REPORT_INTRO,
