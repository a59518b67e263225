# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local stack (demo, stack) needs the runtime and two packages; the tests the rest.
STACK := $(VENV)/.stack-installed
DEV := $(VENV)/.installed

.PHONY: demo stack test lint unit checkov testbench python clean

# A .venv made by another Python (a first try with 3.10, say) is rebuilt, not reused:
# checked as the Makefile is read, before make looks at what .venv holds.
WANT_PYTHON := $(shell $(PYTHON) -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)
HAVE_PYTHON := $(shell sed -n 's/^version *= *//p' $(VENV)/pyvenv.cfg 2>/dev/null)
ifneq ($(HAVE_PYTHON),)
ifneq ($(HAVE_PYTHON),$(WANT_PYTHON))
$(info $(VENV) was made by Python $(HAVE_PYTHON), not $(PYTHON) ($(WANT_PYTHON)): rebuilding it)
$(shell rm -rf $(VENV))
endif
endif

# Python 3.11 or newer, checked before anything is installed.
python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "captioner needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1)." >&2; \
	  echo "Install one (python.org, pyenv, or your system's python3.11) and run again," >&2; \
	  echo "e.g. make demo PYTHON=python3.12" >&2; exit 1; }

$(VENV)/pyvenv.cfg: | python
	$(PYTHON) -m venv $(VENV)

# The clone's src/ on the venv's path (captioner, and the local stack in captioner_dev)
# and a `captioner` command in .venv/bin, with nothing built or installed.
$(BIN)/captioner: | $(VENV)/pyvenv.cfg
	@$(BIN)/python -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_path("purelib"), "captioner-clone.pth").write_text(str(pathlib.Path("src").resolve()) + "\n")'
	@printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m captioner "$$@"\n' > $(BIN)/captioner
	@chmod +x $(BIN)/captioner

$(STACK): requirements.txt requirements-stack.txt | python $(BIN)/captioner
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-stack.txt
	touch $(STACK)

$(DEV): $(STACK) requirements-dev.txt tests/terraform/requirements.txt | python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(DEV)

## Start the local stack, upload the sample photos, caption them, print the captions.
demo: python $(STACK)
	$(BIN)/python -m captioner_dev.demo

## The local stack in the foreground (Ctrl-C stops it), with the sample photos in
## gs://my-photos/, and the `export` lines that point the CLI at it.
stack: python $(STACK)
	$(BIN)/python -m captioner_dev.stack $(ARGS)

## Every test: lint, types, unit, integration, end to end, Terraform checks.
test: python $(DEV) lint checkov testbench
	$(BIN)/python -m pytest -q

## Static security scan of terraform/ (checkov lives in its own .venv-checkov).
checkov:
	bash tests/terraform/run_checkov.sh

## Google's Cloud Storage emulator for tests/testbench, in its own .venv-testbench; only
## where ../shared/vendor has it (elsewhere those tests skip).
testbench:
	bash tests/testbench/install.sh

lint: python $(DEV)
	$(BIN)/ruff check src main.py tests bench
	$(BIN)/ruff format --check src main.py tests bench
	$(BIN)/mypy

unit: python $(DEV)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .venv-checkov .venv-testbench .pytest_cache .mypy_cache .ruff_cache
