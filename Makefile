# One-command setup and test. torch goes in first, from the index of the build asked for, so that
# no later requirement pulls another build: PyPI's Linux x86_64 wheel of torch is the CUDA build
# (several GB), so TORCH=cpu (the default) takes PyTorch's CPU index; TORCH=cuda takes PyPI's
# wheel; TORCH_INDEX_URL=<url> any other index (e.g. https://download.pytorch.org/whl/cu126).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?= $(if $(filter cpu,$(TORCH)),https://download.pytorch.org/whl/cpu,)

.PHONY: setup lint test test-slow test-all test-slurm run benchmark

setup:
	$(if $(filter-out cpu cuda,$(TORCH)),$(error TORCH must be cpu or cuda (or set TORCH_INDEX_URL), got '$(TORCH)'))
	$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian / Ubuntu, apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)$(if $(TORCH_INDEX_URL), --index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e '.[test]'

# the quick tier, before every commit (< 10 min on the 2-core VM), one pytest-xdist worker per core
# (TEST_WORKERS=0: one process): alone in one process it kept 1.1 of 2 cores busy; each test
# file stays on one worker (--dist loadfile: its module fixtures are built once) and the workers
# share one finished tiny study (tests/conftest.py). The long end-to-end checks (pytest mark
# `slow`) run in `make test-slow`, on the same workers: in one process it kept 1.1 of 2 cores busy
# and CI's side checks beside it did not fill the rest (.ci/run)
TEST_WORKERS ?= auto
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=20 $(XDIST)

test-slow:
	$(BIN)/python -m pytest -q -m slow --durations=20 $(XDIST)

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
