# tether's own tasks. `make` alone lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test pytest lint fmt typecheck bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install tether with its test and dev extras

$(STAMP): pyproject.toml
	-benchmarks/ensure-h2load
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

demo: setup ## run the demo: the shop example's services, governed, in five narrated steps
	$(PY) examples/demo.py

test: lint typecheck pytest ## everything CI runs: lint, format check, mypy strict, the test suite

pytest: setup ## the test suite only
	$(PY) -m pytest

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check framework tests examples benchmarks
	$(VENV)/bin/ruff format --check framework tests examples benchmarks

fmt: setup ## format and autofix
	$(VENV)/bin/ruff format framework tests examples benchmarks
	$(VENV)/bin/ruff check --fix framework tests examples benchmarks

bench: setup ## run every benchmark and rewrite BENCHMARKS.md (needs h2load: nghttp2-client)
	$(PY) -m benchmarks.run

typecheck: setup ## mypy --strict on framework/
	$(VENV)/bin/mypy

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
