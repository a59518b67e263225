# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit checkov testbench clean

$(STAMP): requirements.txt requirements-dev.txt tests/terraform/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

## Start the local stack, upload the sample photos, caption them, print the captions.
demo: $(STAMP)
	PYTHONPATH=src $(BIN)/python -m captioner_dev.demo

## Every test: lint, types, unit, integration, end to end, Terraform checks.
test: $(STAMP) lint checkov testbench
	$(BIN)/python -m pytest -q

## Static security scan of terraform/ (checkov lives in its own .venv-checkov).
checkov:
	bash tests/terraform/run_checkov.sh

## Google's Cloud Storage emulator for tests/testbench, in its own .venv-testbench; only
## where ../shared/vendor has it (elsewhere those tests skip).
testbench:
	bash tests/testbench/install.sh

lint: $(STAMP)
	$(BIN)/ruff check src main.py tests bench
	$(BIN)/ruff format --check src main.py tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .venv-checkov .venv-testbench .pytest_cache .mypy_cache .ruff_cache
