# The two commands of the README:
#   make run    set up what is missing, run the default workflow, write the report
#   make test   set up what is missing, run the test suite
PYTHON ?= python3
CORES ?= all
SNAKEMAKE = $(PYTHON) -m snakemake

.PHONY: run test setup report lint dry-run-paper

run: setup
	$(SNAKEMAKE) --cores $(CORES)
	$(SNAKEMAKE) --report results/report.html
	@echo "Figures: results/figures/  Statistics: results/stats/  Report: results/report.html"

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
