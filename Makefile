# sgjax — every target is a thin call into Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= quick
OUT    ?= results

# The offline datasets, when the repository sits next to a shared/data folder (otherwise
# the loader uses ~/.cache/sgjax/data, downloading what is missing on first use).
ifneq ($(wildcard ../shared/data/mnist),)
export SGJAX_DATA_DIR ?= $(abspath ../shared/data)
endif
# On the accelerator the datasets come with the checkout (make device-data, carried).
ifneq ($(wildcard .device-data/mnist),)
export SGJAX_DATA_DIR ?= $(abspath .device-data)
endif

# The device script: python of the venv here, the image's python3 on the accelerator.
DEVICE_PY := $(if $(wildcard $(PY)),$(PY),python3)
# Its preset: paper unless PRESET is given (PRESET=smoke: a dry run on this CPU).
DEVICE_PRESET := $(if $(filter command line environment,$(origin PRESET)),$(PRESET),paper)
DATA_SRC ?= $(or $(SGJAX_DATA_DIR),../shared/data)

.PHONY: install test test-min test-slow test-distributed test-notebooks lint bench notebooks reproduce-all \
	reports list help \
	device-paper device-import device-data

help:  ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## create .venv and install sgjax (editable) with the experiments and dev extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[experiments,dev]'

# Test processes (pytest-xdist): XLA compiles on one thread, so two processes keep both
# cores busy (the default suite: 7.4 min in one process, 5.3 min in two, same machine).
TEST_JOBS ?= 2

test:  ## the default test suite (~4 min on 2 cores; slow, notebook, distributed and reproduce tests excluded)
	$(PY) -m pytest -n $(TEST_JOBS)

# The declared floors (pyproject's dependencies), pinned exactly, with the test tools of their
# time; sgjax itself without dependencies, so nothing newer slips in.
MIN_VENV ?= .venv-min
MIN_PY   := $(MIN_VENV)/bin/python
MIN_PINS := jax==0.5.0 jaxlib==0.5.0 flax==0.10.0 optax==0.2.0 numpy==1.26.0 \
	chex==0.1.86 pytest==8.1.1
# The library tests: the files that exercise sgjax/ and import only sgjax, chex, pytest,
# numpy, jax, flax, optax (test_bench_reference also loads benchmarks/plain_reference.py,
# plain JAX). test_unlock.py's experiment tests (experiments.dni.unlock needs the
# experiments extra) are deselected by name.
MIN_TESTS := tests/test_layers.py tests/test_losses_metrics.py tests/test_optim.py \
	tests/test_predictors.py tests/test_feedback.py tests/test_split.py tests/test_train.py \
	tests/test_semantics.py tests/test_recurrent.py tests/test_multirate.py \
	tests/test_unlock.py tests/test_step_cost.py tests/test_bench_reference.py \
	tests/test_multidevice.py tests/test_contract.py tests/test_models.py \
	tests/test_launch.py tests/test_multiprocess.py
MIN_DESELECT := not experiment and not quick_is and not r_squared and not input_fit

test-min:  ## the library tests at the lowest declared jax/flax/optax/numpy (own venv, .venv-min)
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q $(MIN_PINS)
	$(MIN_PY) -m pip install -q --no-deps -e .
	$(MIN_PY) -c "import jax, flax, optax, numpy; print('test-min:', 'jax', jax.__version__, \
	'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)"
	$(MIN_PY) -m pytest -x -q -m 'not slow' -p no:cacheprovider -p no:xdist \
	-k '$(MIN_DESELECT)' $(MIN_TESTS)

test-distributed:  ## stages on several devices and processes: forced-device and multi-process runs (~2 min)
	$(PY) -m pytest -n $(TEST_JOBS) -m 'distributed and not slow' tests/test_multidevice.py \
	tests/test_launch.py tests/test_multiprocess.py

test-reproduce:  ## experiments end to end through the CLI at the smoke preset (~1 min)
	$(PY) -m pytest -n $(TEST_JOBS) -m 'reproduce and not slow'

test-slow:  ## only the slow tests
	$(PY) -m pytest -m slow

lint:  ## ruff
	$(PY) -m ruff check sgjax experiments tests benchmarks

bench:  ## step-time benchmarks: DNI MNIST FCN shape, recurrent DNI on the PTB shape, the Runner
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/recurrent_step_time.py
	$(PY) benchmarks/runner_time.py

test-notebooks:  ## execute every notebook at the smoke preset (minutes; not in make test)
	$(PY) -m pytest -m notebooks tests/test_notebooks.py

notebooks: test-notebooks  ## the same as test-notebooks

list:  ## list the experiments with their measured quick wall time
	$(PY) -m experiments list

# SET='steps=200 lr=1e-3': --set overrides of the preset's config (python -m experiments run
# --help); each cell's identity and table.md record them.
SET_ARGS = $(foreach s,$(SET),--set '$(s)')

reproduce-all:  ## every experiment at PRESET (default quick; PRESET=smoke checks wiring)
	$(PY) -m experiments run all --preset $(PRESET) --out $(OUT) $(SET_ARGS)

reproduce-%:  ## one experiment, e.g. make reproduce-table1 (PRESET=quick by default; SET='steps=200')
	$(PY) -m experiments run $* --preset $(PRESET) --out $(OUT) $(SET_ARGS)

reports:  ## copy the finished quick runs under OUT into reports/ (no rerun)
	$(PY) -m experiments report --results $(OUT)

device-paper:  ## accelerator lease: paper-protocol priority list in ~9 min, <= 8 files into OUT (PRESET=smoke: dry run here)
	@test -n "$(OUT)" -a "$(OUT)" != results || { echo "error: give the device's output folder: make device-paper OUT=\$$OUT" >&2; exit 2; }
	XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m experiments device $(OUT) --preset $(DEVICE_PRESET)

device-import:  ## unpack what device-paper wrote (FILES=<dir>) into results/, publish reports/NAME/paper/
	@test -n "$(FILES)" || { echo "error: give the folder the device's files came back to: make device-import FILES=<dir>" >&2; exit 2; }
	$(PY) -m experiments import-device $(FILES)

device-data:  ## copy MNIST and the PTB word files into .device-data/ (git-ignored) to carry to the accelerator
	mkdir -p .device-data/mnist .device-data/ptb
	cp $(DATA_SRC)/mnist/*.gz .device-data/mnist/
	cp $(DATA_SRC)/ptb/ptb.train.txt $(DATA_SRC)/ptb/ptb.valid.txt $(DATA_SRC)/ptb/ptb.test.txt .device-data/ptb/
	@x=$$(git rev-parse --git-common-dir)/info/exclude; grep -qx '/.device-data/' $$x 2>/dev/null || echo '/.device-data/' >> $$x
	@du -sh .device-data
