# sgjax — every target is a thin call into Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= quick
OUT    ?= results

# The offline datasets, when the repository sits next to a shared/data folder (otherwise
# the loader looks in ~/.cache/sgjax/data, then tensorflow-datasets).
ifneq ($(wildcard ../shared/data/mnist),)
export SGJAX_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: install test test-slow lint bench notebooks reproduce-all reports list help

help:  ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## create .venv and install sgjax (editable) with the dev extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'

test:  ## the default test suite (fast; slow tests excluded)
	$(PY) -m pytest

test-slow:  ## only the slow tests
	$(PY) -m pytest -m slow

lint:  ## ruff
	$(PY) -m ruff check sgjax experiments tests benchmarks

bench:  ## step-time benchmarks: DNI MNIST FCN shape, then recurrent DNI on the PTB shape
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/recurrent_step_time.py

notebooks:  ## execute every notebook at the smoke preset
	$(PY) -m pytest tests/test_notebooks.py

list:  ## list the experiments with their measured quick wall time
	$(PY) -m experiments list

reproduce-all:  ## every experiment at PRESET (default quick; PRESET=smoke checks wiring)
	$(PY) -m experiments run all --preset $(PRESET) --out $(OUT)

reproduce-%:  ## one experiment, e.g. make reproduce-table1 (PRESET=quick by default)
	$(PY) -m experiments run $* --preset $(PRESET) --out $(OUT)

reports:  ## copy the finished quick runs under OUT into reports/ (no rerun)
	$(PY) -m experiments report --results $(OUT)
