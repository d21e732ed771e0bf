# Two entry points (see README): `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/datasets/cifar10-jpeg.tar.gz
PORT ?= 3000
BIN := $(VENV)/bin

.PHONY: install serve test lint browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision come from the normal index (on the project's CPU machines pip takes
# the local 2.14.1 / 0.29.1 wheels); everything else from pyproject.toml.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/bentoml serve --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's Chromium and ChromeDriver for the page test (tests/test_page.py); skipped when already installed.
browser:
	scripts/install-browser.sh

test: lint browser
	CIFAR10_JPEG=$(DATA) $(BIN)/python -m pytest
