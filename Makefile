# Set-up and entry points. `make run` and `make test` work on a new machine: they
# create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Debian packages the tests use: dciodvfy (dicom3tools) validates written DICOM
# objects, prometheus is the real server of the monitoring tests, and chromium is
# the browser of the gateway page test, and libb64-0d is a library of Triton's
# perf_analyzer (the serving benchmark). Installed as root, once, when one is missing.
SYSTEM_PACKAGES ?= dicom3tools prometheus chromium libb64-0d

.PHONY: venv system run test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: venv
	$(BIN)/clinfer run

system:
	@missing=""; \
	for package in $(SYSTEM_PACKAGES); do \
		dpkg -s $$package >/dev/null 2>&1 || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; \
	fi

test: venv system
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check clinfer export client workers bench tests

clean:
	rm -rf results test-artifacts
