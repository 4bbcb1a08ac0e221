# Two commands for a fresh machine: `make demo` and `make test`. Both set up everything
# first (system packages, venv, dependencies, llama.cpp build, the model pair) and reuse
# what is already there on later runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UPLIMIT := $(VENV)/bin/uplimit
export UPLIMIT_HOME ?= $(HOME)/.cache/uplimit
# The torch CPU wheel lies on this machine kind's disk; plain `torch` from PyPI is a CUDA build.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# The kernel meter (nftables in a network namespace) and the shared PostgreSQL ledger.
SYSTEM_PACKAGES := nftables iproute2 postgresql libpq5 util-linux procps

.PHONY: setup demo test lint fuzz system-packages models
setup: system-packages $(VENV)/.installed models

# As root with apt (CI, a fresh machine of this kind), install what is missing; elsewhere
# say what the tests will skip instead of failing.
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "note: not root or no apt-get; missing $$missing: kernel-meter and PostgreSQL tests will skip"; \
	fi

$(VENV)/.installed: pyproject.toml scripts/build_llama_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/build_llama_wheel.sh $(PY)
	$(PY) -m pip install -q $(PIP_FIND) -e '.[hf,pg,dev]'
	touch $@

# Fast when the pair is there: each file's verified hash is stamped.
models: $(VENV)/.installed
	$(UPLIMIT) models fetch

demo: setup
	$(UPLIMIT) demo

test: setup
	UPLIMIT_REQUIRE_REAL=1 $(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# Fuzz the outer side's parsers and decoder (minutes; counts and findings: docs/link.md).
fuzz: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) tests/fuzz/fuzz_link.py uplink -runs=500000
	$(PY) tests/fuzz/fuzz_link.py downlink -runs=500000
	$(PY) tests/fuzz/fuzz_link.py receiver -runs=20000 -len_control=0 -max_len=512
