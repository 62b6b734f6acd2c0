# tether's own tasks. `make` alone lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test pytest lint fmt typecheck bench h2load clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install tether with its test and dev extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

demo: setup ## run the demo: six processes of the shop's four services, in five steps
	$(PY) examples/demo.py

test: h2load lint typecheck pytest ## everything CI runs: lint, format check, mypy strict, the test suite

pytest: setup h2load ## the test suite only (the benchmarks' harness test needs h2load)
	$(PY) -m pytest

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check framework tests examples benchmarks
	$(VENV)/bin/ruff format --check framework tests examples benchmarks

fmt: setup ## format and autofix
	$(VENV)/bin/ruff format framework tests examples benchmarks
	$(VENV)/bin/ruff check --fix framework tests examples benchmarks

bench: setup h2load ## run every benchmark and rewrite BENCHMARKS.md
	$(PY) -m benchmarks.run

# Only the benchmarks drive calls with h2load, so only bench and the test suite (which runs the
# benchmarks' harness test) need it; setup and demo never touch apt-get.
h2load: ## install h2load (nghttp2-client) if missing: apt-get when root, else says how
	@benchmarks/ensure-h2load

typecheck: setup ## mypy --strict on framework/
	$(VENV)/bin/mypy

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
