# PruneScope: `make run` sets everything up and opens the dashboard, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8501
# The CPU build of torch, as this machine kind offers it through pip. Installed first and on
# its own, so that nothing later resolves an unpinned torch (several GB of CUDA wheels).
TORCH := torch==2.13.0

.PHONY: venv venv-run run test bench mutation demo demo-lm clean

# The bare venv plus torch. torch is installed on its own, first, so that the later
# `pip install -e .` finds torch==2.13.0 already satisfied.
$(VENV)/.stamp-torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	touch $@

$(VENV)/.stamp-run: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.stamp-bench: pyproject.toml $(VENV)/.stamp-test
	$(PIP) install -e ".[test,bench]"
	touch $@

$(VENV)/.stamp-mutation: pyproject.toml $(VENV)/.stamp-test
	$(PIP) install -e ".[test,mutation]"
	touch $@

venv: $(VENV)/.stamp-test

venv-run: $(VENV)/.stamp-run

run: $(VENV)/.stamp-run
	@if [ -f dashboard/app.py ]; then \
		$(PY) -m dashboard.serve --server.headless true \
			--server.address 127.0.0.1 --server.port $(PORT); \
	else \
		echo "dashboard/app.py not found: pruning the demo model from the CLI instead"; \
		$(VENV)/bin/prunescope prune demo --ratio 0.5 --out out/demo; \
	fi

# Three workers on two cores, whole files each (module fixtures are built once): the browser
# and subprocess tests spend part of their time waiting on Chromium, Streamlit and child
# processes, and a third worker fills those waits (quiet 2-core machine: 518 s with three,
# 565 s with two). tests/conftest.py hands out the longest files first (by their seconds in
# the last whole run, kept in .pytest_cache/) and turns xdist's own reordering off, so that
# every worker stays busy to the end. The browser files go to one worker as one unit: one
# Streamlit server and one Chromium.
test: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 3 --dist loadfile

bench: $(VENV)/.stamp-bench
	$(PY) -m bench

# Mutation testing (not part of `make test`): TARGETS=... picks targets (`$(PY) -m bench.mutation
# --list`); the default is the verification, planning and recovery modules. docs/mutation-testing.md
mutation: $(VENV)/.stamp-mutation
	$(PY) -m bench.mutation $(TARGETS)

demo: $(VENV)/.stamp-test
	$(PY) assets/train_demo.py --out assets

demo-lm: $(VENV)/.stamp-test
	$(PY) assets/train_demo_lm.py --out assets

clean:
	rm -rf out test-artifacts .pytest_cache .ruff_cache .hypothesis
