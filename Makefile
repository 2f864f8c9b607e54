# `make run` and `make test` set everything up (idempotently) and then do their job.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kport-installed
TEST_STAMP := $(VENV)/.kport-test-installed
BPF_OBJ := kport/sources/proc_bpf.bpf.o

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml scripts/setup-system.sh
	sh scripts/setup-system.sh
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# the proc source's eBPF object, built against this kernel's BTF (where it has none, kport
# uses the proc connector, and this says so)
$(BPF_OBJ): kport/sources/proc_bpf.bpf.c scripts/build-bpf.sh $(STAMP)
	sh scripts/build-bpf.sh --optional $@

$(TEST_STAMP): $(STAMP)
	sh scripts/setup-system.sh --tests
	touch $(TEST_STAMP)

setup: $(STAMP) $(BPF_OBJ)

run: setup
	@echo "kport serve with its web UI: open the URL below; or watch with '$(BIN)/kport tail proc'"
	@echo "(and 'kport status') in another terminal; Ctrl-C stops"
	$(BIN)/kport serve --ui 127.0.0.1:8787

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint $(TEST_STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
