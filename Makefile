# damops: `make run` runs the main job, `make test` the tests. Each sets up
# its own virtual environment in .venv the first time.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test test-unit test-e2e bench bench-quick bench-k8s clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

## run: start an embedded PostgreSQL, pre-heat workers, process a demo batch with live progress
run: $(BIN)/.installed
	$(BIN)/damops run --demo --ui

# Lint, format check and type check, then pytest. Every step runs (one run
# reports every problem); the target fails if any step failed, naming them.
define checked_pytest
	@failed=""; \
	$(BIN)/ruff check || failed="$$failed ruff-check"; \
	$(BIN)/ruff format --check || failed="$$failed ruff-format"; \
	$(BIN)/mypy || failed="$$failed mypy"; \
	$(BIN)/pytest $(1) $(PYTEST_ARGS) || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make $@: failed:$$failed" >&2; exit 1; fi
endef

## test: ruff (lint + format), mypy on operator/damops, then the whole suite (the e2e part skips with a printed reason when no cluster is reachable)
test: $(BIN)/.installed
	$(call checked_pytest,)

## test-unit: the same checks, then every test but e2e
test-unit: $(BIN)/.installed
	$(call checked_pytest,--ignore=tests/e2e)

test-e2e: $(BIN)/.installed
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py

bench-quick: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run.py --quick

# damops on the cluster KUBECONFIG names (eval "$$(hack/local-cluster env)" first): figures, not a test.
bench-k8s: $(BIN)/.installed
	$(BIN)/python bench/k8s.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache  # the embedded database lives in DAMOPS_HOME (~/.local/share/damops): not removed

# Kubernetes targets (kind for users with Docker, the local cluster for CI).
-include mk/*.mk
