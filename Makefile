# caplab: every target bootstraps its own tools; nothing to install by hand.
#   make demo   - the main job: both stores side by side, report in ./demo-out
#   make test   - lint, types, generated-code freshness, the test suite
SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synced

.PHONY: all demo test lint typecheck proto proto-check pytest soak bench clean

all: test

$(UV):
	@command -v uv >/dev/null 2>&1 && { mkdir -p $(TOOLS)/bin && ln -sf "$$(command -v uv)" $(UV); } \
	  || { $(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install --quiet 'uv>=0.4,<1'; }

$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/caplab demo --out demo-out

proto: $(STAMP)
	$(PY) -m caplab.protogen

proto-check: $(STAMP)
	$(PY) -m caplab.protogen --check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: lint typecheck proto-check pytest

soak: $(STAMP)
	CAPLAB_SOAK=1 $(VENV)/bin/pytest -q -m soak tests

bench: $(STAMP)
	$(VENV)/bin/caplab bench --store raft
	$(VENV)/bin/caplab bench --store gossip

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache demo-out
