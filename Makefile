# damops: `make run` runs the main job, `make test` the tests. Each sets up
# its own virtual environment in .venv the first time.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test test-unit test-e2e bench bench-quick clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

## run: start an embedded PostgreSQL, pre-heat workers, process a demo batch with live progress
run: $(BIN)/.installed
	$(BIN)/damops run --demo

## test: the whole suite (the e2e part skips with a printed reason when no cluster is reachable)
test: $(BIN)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(BIN)/.installed
	$(BIN)/pytest --ignore=tests/e2e $(PYTEST_ARGS)

test-e2e: $(BIN)/.installed
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py

bench-quick: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .damops .pytest_cache

# Kubernetes targets (kind for users with Docker, the local cluster for CI).
-include mk/*.mk
