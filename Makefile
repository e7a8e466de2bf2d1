# One entry point for every check: `make check` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv demo check lint types test test-fast test-localstack test-container lint-infra bench soak bench-downtime chaos lock clean

help:
	@echo "make demo             the pipeline end to end on local stand-ins (Ctrl-C to stop)"
	@echo "make check            lint, types, infrastructure lint and the whole test suite"
	@echo "make test-localstack  the compose path against real LocalStack 4.14.0 (Python 3.13)"
	@echo "make test-container   the image built and run by podman, compose on host LocalStack"
	@echo "make bench            the benchmark (prints figures; see README, Performance)"
	@echo "make bench-downtime   three days of downtime at 1,800 symbols: RSS and loop stalls"
	@echo "make chaos            a real daemon through pause, outage, full spool and disk, kill (~19 min)"

$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements-dev.lock -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/finnstream demo

lint: $(STAMP)
	$(BIN)/ruff check finnstream tests $(wildcard bench)
	$(BIN)/ruff format --check finnstream tests $(wildcard bench)

types: $(STAMP)
	$(BIN)/mypy

lint-infra: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/lint-infra.sh

test: $(STAMP)
	$(BIN)/pytest

check: lint types lint-infra test test-localstack test-container

test-localstack: $(STAMP)
	bash scripts/localstack.sh

test-container: $(STAMP)
	bash scripts/container.sh

bench: $(STAMP)
	$(BIN)/python bench/bench.py

soak: $(STAMP)
	$(BIN)/python bench/bench.py --soak

bench-downtime: $(STAMP)
	$(BIN)/python bench/bench.py --downtime

chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

# Regenerate the pinned sets after changing dependencies in pyproject.toml.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip && .venv-lock/bin/pip install --quiet .
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^finnstream' > requirements.lock
	.venv-lock/bin/pip install --quiet '.[dev]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^finnstream' > requirements-dev.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-localstack .venv-container .pytest_cache .mypy_cache .ruff_cache build *.egg-info
