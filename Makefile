# Set-up and the two main commands. Override TORCH_SPEC to choose your torch build, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_DIR ?= runs/instructgpt

.PHONY: install install-test demo reproduce test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, so the project's torch range is already satisfied and no other build is pulled in
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## The full InstructGPT pipeline on the built-in world; prints the result table.
demo: install
	$(BIN)/instructrl run instructgpt --run-dir $(RUN_DIR) --overwrite

## The paper's claims: 3 independent pipelines × (PPO, PPO-ptx at γ = 27.8, PPO at β = 2), then
## docs/results.md (targets, intervals, the over-optimisation fit). Resumable: run it again.
reproduce: install
	$(BIN)/instructrl sweep instructgpt_claims --out sweeps/instructgpt_claims
	$(BIN)/instructrl claims sweeps/instructgpt_claims --out docs/results.md

## The whole test suite (lint, format check, tests).
test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-test
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
