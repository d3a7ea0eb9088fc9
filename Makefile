# windtunnel — `make help` lists the targets. The two commands of the README:
#   make demo   set up and run a wind tunnel on the embedded corpus (CPU)
#   make test   set up and run the whole test suite (starts MLflow, SLURM, Ray itself)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WT := $(VENV)/bin/windtunnel
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench coordcheck services-up services-down clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

install: ## create .venv and install windtunnel (CPU torch where there is no CUDA)
	@bash scripts/install.sh

demo: install ## set up and run the CPU wind tunnel (tunnels/demo.yaml): search, laws, plan, report
	$(WT) prepare
	$(WT) tunnel demo

test: install ## set up and run every test (lint, layers, types, unit, integration with real services)
	$(VENV)/bin/ruff check windtunnel tests
	$(VENV)/bin/ruff format --check windtunnel tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install ## unit tests only (no services, no slow tests)
	$(VENV)/bin/pytest -m "not integration and not slow" $(PYTEST_ARGS)

lint: install ## ruff lint and format check, the layers contract (import-linter), mypy
	$(VENV)/bin/ruff check windtunnel tests
	$(VENV)/bin/ruff format --check windtunnel tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix windtunnel tests
	$(VENV)/bin/ruff format windtunnel tests

bench: install ## training throughput vs the machine's matmul peak (docs/benchmarks.md)
	$(WT) bench

coordcheck: install ## μP coordinate check plot under .windtunnel/coordcheck/
	$(WT) coordcheck

clean: ## remove runs, prepared data and the local MLflow store (keeps .venv)
	rm -rf .windtunnel
