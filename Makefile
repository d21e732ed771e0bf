# Two entry points (see README): `make serve` and `make test`. Both install first.
#   make serve [HOST=0.0.0.0] [PORT=3000] [MODEL=exported_models/NAME or cifar10-classifier:TAG]
#   make test [DATA=path/to/cifar10]
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/datasets/cifar10-jpeg.tar.gz
HOST ?= 127.0.0.1
PORT ?= 3000
MODEL ?=
BIN := $(VENV)/bin

.PHONY: install install-dev serve test lint browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Serving: `pip install -e .` (bundle, service, predictor: no torch). Tests: `.[dev]`, which adds torch and
# torchvision (on the project's CPU machines pip takes the local 2.14.1 / 0.29.1 wheels), the exporters and
# the benchmarks' peers. A dev install also satisfies serving.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# Binds 127.0.0.1 unless HOST says otherwise (BentoML's own default is every interface).
serve: install
	$(BIN)/bentoml serve --host $(HOST) --port $(PORT) $(if $(MODEL),--arg model=$(MODEL))

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's Chromium and ChromeDriver for the page test (tests/test_page.py); skipped when already installed.
browser:
	scripts/install-browser.sh

test: lint browser
	CIFAR10_DATA=$(DATA) $(BIN)/python -m pytest
