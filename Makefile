# sgjax — every target is a thin call into Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= smoke
OUT    ?= results

.PHONY: install test test-slow lint bench notebooks reproduce-all list help

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

bench:  ## step-time benchmark on the DNI MNIST FCN shape (ratios from one run)
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/recurrent_step_time.py

notebooks:  ## execute every notebook at the smoke preset
	$(PY) -m pytest tests/test_notebooks.py

list:  ## list the experiments
	$(PY) -m experiments list

reproduce-all:  ## every experiment at PRESET (default smoke)
	$(PY) -m experiments run all --preset $(PRESET) --out $(OUT)

reproduce-%:  ## one experiment, e.g. make reproduce-table1 PRESET=quick
	$(PY) -m experiments run $* --preset $(PRESET) --out $(OUT)
