# The two set-up commands of the README. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# Real datasets, when present (CI and the developers' machines have them in ../shared/data).
DATA_DIR ?= $(or $(BSTREC_DATA_DIR),$(wildcard ../shared/data))
BIN := $(VENV)/bin

.PHONY: quickstart test lint system-deps bench-data bench-rank bench-serving clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/bstrec quickstart $(if $(DATA_DIR),--data-dir $(DATA_DIR))

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# redis-server and chromium for the tests that drive them, when this machine lets us install them
system-deps:
	bash .ci/system-deps

test: lint system-deps
	BSTREC_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest

bench-data: $(VENV)/.installed
	BSTREC_DATA_DIR=$(DATA_DIR) $(BIN)/python benchmarks/bench_data.py

$(VENV)/.installed-peers: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[peers]'
	touch $@

bench-rank: $(VENV)/.installed-peers
	BSTREC_DATA_DIR=$(DATA_DIR) $(BIN)/python benchmarks/bench_rank.py

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench-serving: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_serving.py $(if $(DATA_DIR),--data-dir $(DATA_DIR))

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
