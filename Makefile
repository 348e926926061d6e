# Set-up and entry points. `make run` and `make test` work on a new machine: they
# create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv run test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: venv
	$(BIN)/clinfer run

test: venv
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check clinfer export client workers bench tests

clean:
	rm -rf results test-artifacts
