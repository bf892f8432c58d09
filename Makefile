# Two commands on a fresh machine:
#   make demo   the main job on the embedded default (builds .venv first)
#   make test   the lint (ruff.toml) and the test suite (builds .venv first)
# TORCH picks the PyTorch release and TORCH_INDEX the index it comes from: by default the CPU
# build of the release this project is tested with, from PyTorch's CPU index (where that index
# cannot be reached, pip goes on to its other sources: on the development machines, a local CPU
# wheel). On a GPU machine: `make demo TORCH="torch>=2.4" TORCH_INDEX=` (PyPI's CUDA build) or
# TORCH_INDEX=https://download.pytorch.org/whl/cu128. torch's own dependencies come from PyPI.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-all bench clean

$(VENV)/.installed: setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m harness demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
