# medfed: `make demo` runs the local consortium demo, `make test` runs the test suite.
PYTHON ?= python3
# This machine's CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfed-installed
# Test files run in this many processes (pytest-xdist); the tests wait on servers,
# sockets and subprocesses much of the time. One file stays in one process (its shared
# fixtures, e.g. a deployment, start once).
TEST_WORKERS ?= 2

.PHONY: demo test lint setup clean

demo: $(STAMP)
	$(BIN)/medfed demo

test: $(STAMP) lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check federation client server medfed conf scripts tests
	$(BIN)/mypy
	$(BIN)/lint-imports

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) consortium outputs mlflow.db mlartifacts
