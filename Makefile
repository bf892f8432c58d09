# Two commands on a fresh machine:
#   make demo   the main job on the embedded default (builds .venv first)
#   make test   the test suite (builds .venv first)
# TORCH picks the PyTorch build: the default is the CPU wheel this project is tested with;
# on a GPU machine use e.g. `make demo TORCH="torch>=2.4"`.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-all bench clean

$(VENV)/.installed: setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m harness demo

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
