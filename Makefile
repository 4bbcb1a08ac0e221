# Two commands for a fresh machine: `make demo` and `make test`. Both set up everything
# first (venv, dependencies, llama.cpp build, the model pair) and reuse it on later runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UPLIMIT := $(VENV)/bin/uplimit
export UPLIMIT_HOME ?= $(HOME)/.cache/uplimit
# The torch CPU wheel lies on this machine kind's disk; plain `torch` from PyPI is a CUDA build.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test lint models system-packages
setup: $(VENV)/.installed models

$(VENV)/.installed: pyproject.toml scripts/build_llama_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/build_llama_wheel.sh $(PY)
	$(PY) -m pip install -q $(PIP_FIND) -e '.[hf,dev]'
	touch $@

models: $(VENV)/.installed
	$(UPLIMIT) models fetch

demo: setup
	$(UPLIMIT) demo

test: setup
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
