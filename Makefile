# `make demo` sets everything up and runs the built-in demo; `make test` runs the checks and tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Rules call `python -m neuroscribe ...`: the environment's python must come first on PATH.
export PATH := $(BIN):$(PATH)
export HDF5_USE_FILE_LOCKING := FALSE

.PHONY: install system-packages demo test lint pytest plan clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The SLURM tests start a real single-node cluster: Debian's slurm-wlm and munge; the report's
# tests open it in Debian's chromium through chromium-driver. Installed here when missing and run
# as root (elsewhere those tests skip, saying why).
SYSTEM_PACKAGES := slurm-wlm munge chromium chromium-driver
system-packages:
	@if [ "$$(id -u)" = 0 ] && ! (command -v slurmctld && command -v chromedriver) >/dev/null; then \
		apt-get install -y $(SYSTEM_PACKAGES) >/dev/null \
		|| (apt-get update >/dev/null && apt-get install -y $(SYSTEM_PACKAGES) >/dev/null); \
	fi

demo: install
	snakemake --profile profiles/local --configfile config/demo.yaml
	@echo
	@echo "Done. The description table: results/demo/descriptions.parquet (and .csv), with"
	@echo "each method's details in results/demo/descriptions/{dnd,clipdissect,tellme,texplain}.parquet;"
	@echo "the evaluation: results/demo/evaluation/ (neurons.parquet, summary.csv); the probe"
	@echo "manifest: results/demo/probe/manifest.parquet; logs: results/demo/logs/."
	@echo "The report: open results/demo/report/index.html in a browser (see README.md, The report)."
	@echo "Every method on the held-out images, against its shuffled labels and the world's truth:"
	@sed -n 's/.*neuroscribe.evaluation.stage: /  /p' results/demo/logs/evaluation_summary.log
	@echo "The planted shortcut in TExplain's per-class words (results/demo/evaluation/shortcuts.csv):"
	@sed -n 's/.*neuroscribe.demo.shortcuts: /  /p' results/demo/logs/evaluate_shortcuts.log

plan: install
	snakemake plan --profile profiles/local --configfile config/demo.yaml

lint: install
	ruff check .
	ruff format --check .
	snakefmt --check .
	snakemake --lint --configfile config/demo.yaml

pytest: install system-packages
	pytest

test: lint pytest

clean:
	rm -rf results .snakemake
