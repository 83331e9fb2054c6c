# LeukoScreen: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONFIG ?=
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-device run preflight test convert sign bench soak reliability-report fresh-check \
	fresh-check-arm64 install-service lint clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-19s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.device: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[device]"
	@touch $@

$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e ".[device,convert,test]"
	@touch $@ $(VENV)/.device

install-device: $(VENV)/.device ## a .venv with the Pi runtime only (numpy, pillow, flask, waitress, gpiozero, LiteRT, simplejpeg)

install: $(VENV)/.all ## a .venv with everything: runtime, host toolchain, tests

run: $(VENV)/.device ## run the appliance (laptop: replays sample images, mock GPIO, page on http://127.0.0.1:8080)
	$(BIN)/python -m device run $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

preflight: ## the system packages the suite needs (Chromium): installed from apt, or the one command to run
	@PY=$(PY) VENV=$(VENV) bash tools/preflight.sh

# preflight first (make builds prerequisites left to right): a missing package stops before the long pip install.
test: preflight $(VENV)/.all ## run the whole test suite (writes only under build/ and temporary folders)
	$(BIN)/python -m pytest $(ARGS)

convert: $(VENV)/.all ## rebuild the model bundle and report in models/ from ../shared/data (skips current steps)
	$(BIN)/python -m convert all $(ARGS)

sign: $(VENV)/.all ## sign models/ (after every make convert) with ~/.config/leukoscreen/signing-key.pem; ARGS="DIR --key K"
	$(BIN)/python -m convert sign $(ARGS)

bench: $(VENV)/.all ## measure speed, memory and start-up; writes bench/results.json and bench/RESULTS.md
	$(BIN)/python -m bench $(ARGS)

soak: $(VENV)/.all ## the full reliability runs (10,000 fields, 50 kills); updates docs/reliability.md
	LEUKO_SOAK=full LEUKO_RELIABILITY_DOC=docs/reliability.md $(BIN)/python -m pytest tests/reliability -m "slow" $(ARGS)

reliability-report: preflight $(VENV)/.all ## the reduced reliability suite; updates docs/reliability.md (commit it)
	LEUKO_RELIABILITY_DOC=docs/reliability.md $(BIN)/python -m pytest tests/reliability $(ARGS)

fresh-check: ## clean Debian bookworm root (debootstrap; needs root): clone, make test (about 30 min)
	bash tools/fresh-machine.sh amd64

fresh-check-arm64: ## the same as an arm64 root under qemu-user: install-device, selftest, classify vs x86
	bash tools/fresh-machine.sh arm64

install-service: ## install the systemd unit on a Raspberry Pi (needs sudo)
	sudo bash systemd/install.sh

lint: $(VENV)/.all ## ruff over the code
	$(BIN)/ruff check device convert tests bench

clean: ## remove build outputs and caches (keeps models/ and .venv)
	rm -rf build .pytest_cache .ruff_cache bench/out
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
