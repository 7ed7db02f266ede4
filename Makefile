# Paystream: `make demo` runs the demo, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install browser-deps pg-deps

$(STAMP): pyproject.toml player/web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	npm ci --prefix player/web --no-audit --no-fund
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway media sample
	$(BIN)/gateway serve --demo

# Debian's Chromium + ChromeDriver for the browser tests (installed when root).
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "browser tests need: sudo apt-get install chromium chromium-driver"; fi; \
	fi

# Debian's PostgreSQL for the shared-ledger tests (installed when root); the
# tests start their own cluster in a temp dir (tests/conftest_pg.py).
pg-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else echo "PostgreSQL tests need: sudo apt-get install postgresql"; fi; \
	fi

test: $(STAMP) browser-deps pg-deps
	$(BIN)/ruff check gateway player tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway player tests
	$(BIN)/lint-imports
	$(BIN)/mypy gateway player
