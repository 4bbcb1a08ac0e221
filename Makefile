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
# The kernel meter (nftables in a network namespace), the shared PostgreSQL ledger, the
# browser the status page is tested in, promtool for the alerting rules, and libfaketime for
# an inner whose system clock steps.
SYSTEM_PACKAGES := nftables iproute2 postgresql libpq5 util-linux procps chromium prometheus faketime

# The llama.cpp build: "best" takes every ISA extension this CPU has, "avx2" the floor
# (scripts/build_llama_wheel.sh). Each has its own cached wheel and its own stamp here.
LLAMA_ISA := $(or $(UPLIMIT_LLAMA_ISA),best)
UV_VERSION := 0.13.9
# What `make test` has set up, so a test that finds it missing fails instead of skipping:
# the model pair always; as root also the kernel quota, PostgreSQL, the browser, promtool and
# libfaketime (tests/conftest.py).
comma := ,
REQUIRE := $(if $(filter 0,$(shell id -u)),real$(comma)kernel$(comma)postgres$(comma)browser$(comma)promtool$(comma)faketime,real)

.PHONY: setup demo test test-slow test-avx2 lint fuzz crash memory load-api lock system-packages models
setup: system-packages $(VENV)/.installed $(VENV)/.llama-$(LLAMA_ISA) models

# As root with apt (CI, a fresh machine of this kind), install what is missing; elsewhere
# say what the tests will skip instead of failing.
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "note: not root or no apt-get; missing $$missing: kernel-meter, PostgreSQL, browser, promtool and faketime tests will skip"; \
	fi

# Every Python dependency comes from requirements.lock, pinned with hashes; nothing is
# resolved at install time. `make lock` refreshes the lock deliberately.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FIND) --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.llama-$(LLAMA_ISA): $(VENV)/.installed scripts/build_llama_wheel.sh
	rm -f $(VENV)/.llama-*
	UPLIMIT_LLAMA_ISA=$(LLAMA_ISA) scripts/build_llama_wheel.sh $(PY)
	touch $@

# Re-resolve every dependency to the newest allowed by pyproject.toml (Linux x86-64,
# CPython 3.11; torch is the CPU build from $(PIP_FIND)); review the diff before committing.
lock: $(VENV)/.installed
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra llama --extra hf --extra pg --extra plot --extra dev \
	  --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  $(PIP_FIND) --custom-compile-command "make lock" -o requirements.lock

# Fast when the pair is there: each file's verified hash is stamped.
models: $(VENV)/.installed $(VENV)/.llama-$(LLAMA_ISA)
	$(UPLIMIT) models fetch

demo: setup
	$(UPLIMIT) demo

test: setup
	UPLIMIT_REQUIRE=$(REQUIRE) $(PY) -m pytest

# The suite with the cases it leaves to UPLIMIT_SLOW=1 (tests/support/marks.py).
test-slow:
	UPLIMIT_SLOW=1 $(MAKE) test

# The suite on the narrowest SIMD paths this project supports: llama.cpp built for AVX2,
# torch's and numpy's kernels dispatched without AVX-512. `make test` afterwards reinstalls
# the machine's best llama.cpp build (both wheels stay cached).
test-avx2:
	ATEN_CPU_CAPABILITY=avx2 NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" \
	  $(MAKE) test UPLIMIT_LLAMA_ISA=avx2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# Fuzz the outer side's parsers and decoder (minutes; counts and findings: docs/link.md).
# kill -9 at scale (#15 item 8): 1,000+ trials of the inner killed mid-charge and mid-write and
# the outer mid-receive, on SQLite and PostgreSQL; prints trials, under-charges (must be 0) and
# the worst over-charge. `make test` runs 54 of them.
crash: setup
	UPLIMIT_CRASH_TRIALS=1002 UPLIMIT_REQUIRE=$(REQUIRE) nice -n 10 $(PY) -m pytest \
	  tests/integration/test_link_crash.py -q -s -p no:cacheprovider

# The API under load on the real pair (#16 item 7): locust users mixing valid and invalid
# requests for LOAD_S seconds; every answer checked, none may be lost.
LOAD_USERS ?= 64
LOAD_S ?= 300
load-api: setup
	UPLIMIT_LOAD_PAIR=real UPLIMIT_LOAD_USERS=$(LOAD_USERS) UPLIMIT_LOAD_S=$(LOAD_S) \
	  UPLIMIT_REQUIRE=real $(PY) -m pytest tests/integration/test_api_load.py -q -s -p no:cacheprovider

# Memory over 100,000 streams from 16 clients through the served tiny pair (#16 item 8): the
# traced heap and RSS after each tenth (about an hour on 2 idle cores; no per-test timeout).
memory: setup
	UPLIMIT_MEMORY_STREAMS=100000 UPLIMIT_MEMORY_CLIENTS=16 nice -n 10 $(PY) -m pytest \
	  tests/integration/test_memory.py -q -s -p no:cacheprovider --timeout 0

fuzz: $(VENV)/.installed
	$(PY) -m pip install -q 'atheris==3.0.0'
	$(PY) tests/fuzz/fuzz_link.py uplink -runs=500000
	$(PY) tests/fuzz/fuzz_link.py downlink -runs=500000
	$(PY) tests/fuzz/fuzz_link.py receiver -runs=20000 -len_control=0 -max_len=512
