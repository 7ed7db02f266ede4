# Paystream: `make demo` runs the demo, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway media sample
	$(BIN)/gateway serve --demo

test: $(STAMP)
	$(BIN)/ruff check gateway player tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway player tests
	$(BIN)/mypy gateway player
