# Two entry points for a fresh machine: `make demo` and `make test`. Both install what is needed first.
# The install step is idempotent: .venv is created once, and packages are reinstalled only when
# pyproject.toml (the dependency list) changes; the stamp file's name carries its hash.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean-demo

setup: $(STAMP)

# Order-only: the stamp's name already changes with pyproject.toml's content, so a checkout that only touches the
# file (a fresh clone, a switch of branch) does not reinstall.
$(STAMP): | pyproject.toml
	@echo "Installing alnus and its dependencies into $(VENV) (once; a few minutes on a fresh machine) ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/alnus demo demo

test: setup
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean-demo:
	rm -rf demo
