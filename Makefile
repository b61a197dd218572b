# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo
PORT ?= 4200
TEST_WORKERS ?= 2
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test bench preview-sheet clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in requirements.txt (torch==2.13.0, the CPU build); pip installs it first-class.
$(VENV)/.installed: $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# the demo renders through this machine's background Prefect server, so its run stays in the UI (link printed)
demo: install
	$(BIN)/avatar-batch server start --port $(PORT)
	$(BIN)/avatar-batch render manifests/demo.parquet --output $(OUT)

# two pytest-xdist workers (the 2-core CI machine): most system tests wait on servers, workers and heartbeats,
# so a second stream of tests fills that time; worksteal balances the few long tests
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25

bench: install
	$(BIN)/python benchmarks/pipeline_bench.py

# the committed before/after contact sheet of the preview renderer (BEFORE=<commit> to compare with)
preview-sheet: install
	$(BIN)/python benchmarks/preview_sheet.py $(if $(BEFORE),--before $(BEFORE))

clean:
	rm -rf out .pytest_cache
