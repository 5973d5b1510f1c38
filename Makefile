# One-command setup and test. torch==2.13.0 (CPU wheel) goes in first so that nothing pulls
# CUDA wheels on a machine without a GPU.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup lint test test-slow test-all test-slurm run benchmark

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'

# the quick tier, before every commit (< 10 min on the 2-core VM); the long end-to-end checks
# (pytest mark `slow`) run in `make test-slow`; CI runs both (.ci/run)
test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:
	$(BIN)/python -m pytest -q -m slow

test-all: lint
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check src tests benchmarks
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint --configfile config/test-tiny.yaml

test-slurm:
	PATH=$(abspath $(BIN)):$$PATH bash tests/slurm/run_workflow_on_slurm.sh

run:
	PATH=$(abspath $(BIN)):$$PATH snakemake --cores all

benchmark:
	$(BIN)/python -m benchmarks
