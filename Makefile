# The README's two commands: `make lab` (the main job) and `make test` (the whole suite).
# Both create .venv on first use and reinstall both distributions only when a pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lab lint typecheck imports pytest

test: lint typecheck imports pytest

lab: $(STAMP)
	$(BIN)/zeta-lab $(LAB_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports --no-logo --no-cache

pytest: $(STAMP)
	$(BIN)/pytest

# Debian ships venv's pip bootstrap separately; without it `venv` fails but leaves a
# half-made .venv behind, which must not count as a venv on the next run.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv" >&2; \
	  exit 1; }

# Both distributions: zeta-agent (what a host installs) and the private lab (zeta-lab).
$(STAMP): pyproject.toml lab/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' -e ./lab
	@touch $@
