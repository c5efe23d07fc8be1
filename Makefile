# scinv: set-up, demo and tests. Every target installs what is missing first (idempotent).
SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
NEXTFLOW   := tools/nextflow
STAMP      := $(VENV)/.installed
OUTDIR     ?= results
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint format options docker-build docker-test nextflow example-data wheelhouse clean help

help:
	@echo "make demo   - set up, then run the pipeline on the bundled data (-profile test)"
	@echo "make test   - set up, then run the whole test suite (includes real Nextflow runs)"
	@echo "make setup  - create .venv with pinned packages and install the pinned Nextflow"
	@echo "make lint   - ruff lint and format check, options in sync, nf-core pipelines lint (what CI runs)"
	@echo "make format - apply ruff's fixes and formatting"
	@echo "make options - write the pipeline's model/training parameters from src/scinv/config.py"
	@echo "make docker-test - build the CPU image and run -profile test,docker against a local run"

setup: $(STAMP) nextflow example-data

# The example data is committed; check it is intact (and re-derive labels if they were deleted).
example-data: assets/liao2020/derived_celltype_labels.csv
	@cd assets/liao2020 && sha256sum --quiet -c SHA256SUMS

assets/liao2020/derived_celltype_labels.csv: | $(STAMP)
	$(VPY) scripts/derive_liao2020_labels.py

$(STAMP): pyproject.toml constraints.txt
	@command -v java >/dev/null && command -v mvn >/dev/null || { \
	  echo "Java and Maven are needed for Nextflow: installing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven; }
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "Headless Chromium is needed by the report test: installing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,baselines]"
	touch $(STAMP)

nextflow:
	@tools/install-nextflow
	@$(NEXTFLOW) -version | grep -q version

demo: setup
	$(NEXTFLOW) run main.nf -profile test --outdir $(OUTDIR) -resume
	@echo "Report: $(abspath $(OUTDIR))/report/scinv_report.html"

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

# ruff (pinned in the test extra, configured in pyproject.toml), the generated options in sync, and
# nf-core's pipeline lint (its own venv: its pins differ; offline, skips documented in .nf-core.yml)
LINT_VENV := .venv-lint
$(LINT_VENV)/.installed:
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q nf-core==4.2.1
	touch $@

lint: $(STAMP) nextflow $(LINT_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VPY) scripts/sync_options.py --check
	PATH="$(CURDIR)/tools:$$PATH" $(LINT_VENV)/bin/nf-core pipelines lint --dir . --plain-text

# nextflow_schema.json, nextflow.config and conf/modules.config from the one definition of the options
options: $(STAMP)
	$(VPY) scripts/sync_options.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docker-build:
	containers/build.sh

# Builds the CPU image (base image made locally when no registry is reachable), runs
# -profile test,docker and compares its outputs with a local run.
docker-test: setup
	containers/docker-test.sh

test-fast: setup
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Wheels of scinv and every pinned dependency, for machines without internet (GPU nodes):
#   python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels "scinv[baselines]"
wheelhouse: setup
	$(VPY) -m pip wheel -q -c constraints.txt -w wheels ".[test,baselines]"

clean:
	rm -rf work results .nextflow .nextflow.log* .pytest_cache .docker-test
