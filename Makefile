# The two commands of the README's quickstart. Each installs whatever is missing first.
#   make serve   install, then run the main job
#   make test    install (Python packages, Chromium), then lint, type-check and run every test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test lint install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build of 2.13.0 lies on disk here; a bare `torch` would pull
	# a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[model,dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/dq serve

# The browser end-to-end test drives Debian's Chromium (no browser download): install it if absent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || $(SUDO) apt-get install -y -qq chromium \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint browser
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
