# SPDX-License-Identifier: Apache-2.0
# `make demo` and `make test` set up .venv when it is missing, then run.
# TORCH pins the CPU build that this machine installs from its local wheel;
# GPU users override it, e.g. `make test TORCH=torch` (with their index in PIP_ARGS).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.pyro_ebm-installed

.PHONY: demo test docs lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q $(PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIP_ARGS) -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pyro-ebm demo

# Tests are hermetic: every cache the library or its dependencies write goes to a
# fresh folder that is removed afterwards, so a green run never leans on ~/.cache.
# lint-imports checks the layer contracts of pyproject.toml (arrows only point down).
test: $(STAMP)
	@cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
	  XDG_CACHE_HOME="$$cache" MPLCONFIGDIR="$$cache/matplotlib" TORCHINDUCTOR_CACHE_DIR="$$cache/inductor" \
	  PYRO_EBM_PROGRESS=0 $(BIN)/python -m pytest -q tests
	$(BIN)/lint-imports
	$(MAKE) docs

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check pyro_ebm tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) docs/_build runs
