# One-command setup and test. torch==2.13.0 (CPU wheel) goes in first so that nothing pulls
# CUDA wheels on a machine without a GPU.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup test test-slurm run benchmark

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'

test:
	$(BIN)/python -m pytest -q

test-slurm:
	PATH=$(abspath $(BIN)):$$PATH bash tests/slurm/run_workflow_on_slurm.sh

run:
	PATH=$(abspath $(BIN)):$$PATH snakemake --cores all

benchmark:
	$(BIN)/python -m benchmarks
