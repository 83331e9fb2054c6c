# LeukoScreen: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONFIG ?=
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-device run test convert bench soak install-service lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.device: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[device]"
	@touch $@

$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[device,convert,test]"
	@touch $@ $(VENV)/.device

install-device: $(VENV)/.device ## a .venv with the Pi runtime only (numpy, pillow, flask, waitress, gpiozero, LiteRT)

install: $(VENV)/.all ## a .venv with everything: runtime, host toolchain, tests

run: $(VENV)/.device ## run the appliance (laptop: replays sample images, mock GPIO, page on http://127.0.0.1:8080)
	$(BIN)/python -m device run $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

test: $(VENV)/.all ## run the whole test suite
	$(BIN)/python -m pytest $(ARGS)

convert: $(VENV)/.all ## rebuild the model bundle and report in models/ from ../shared/data (skips current steps)
	$(BIN)/python -m convert all $(ARGS)

bench: $(VENV)/.all ## measure speed, memory and start-up; writes bench/results.json and bench/RESULTS.md
	$(BIN)/python -m bench $(ARGS)

soak: $(VENV)/.all ## the full reliability runs (10,000 fields, 50 kills)
	LEUKO_SOAK=full $(BIN)/python -m pytest tests/reliability -m "slow" $(ARGS)

install-service: ## install the systemd unit on a Raspberry Pi (needs sudo)
	sudo bash systemd/install.sh

lint: $(VENV)/.all ## ruff over the code
	$(BIN)/ruff check device convert tests bench

clean: ## remove build outputs and caches (keeps models/ and .venv)
	rm -rf build .pytest_cache .ruff_cache bench/out
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
