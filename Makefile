# `make run` and `make test` set everything up (idempotently) and then do their job.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kport-installed

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml scripts/setup-system.sh
	sh scripts/setup-system.sh
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	@echo "kport serve: watch with '$(BIN)/kport tail proc' (or 'kport status') in another terminal; Ctrl-C stops"
	$(BIN)/kport serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
