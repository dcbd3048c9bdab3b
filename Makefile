# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Versions checked together on Python 3.11 (jax 0.10.2 is the newest there); setup.cfg keeps ranges.
CONSTRAINTS := constraints.txt
WORKDIR ?= workdirs/demo

.PHONY: demo test lint install install-test bench notebooks clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is named at its CPU version first so that pip takes the local CPU wheel, not a CUDA build.
$(VENV)/.installed-core: setup.cfg $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: setup.cfg $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test]"
	# rewardbench's own dependency set conflicts with this one; the tests import only its scoring code.
	$(PIP) install -q --no-deps "rewardbench==0.1.4"
	# Its wheel also installs a top-level `tests` package, which would shadow this repository's.
	$(PY) -c "import shutil, sysconfig; shutil.rmtree(sysconfig.get_paths()['purelib'] + '/tests', ignore_errors=True)"
	touch $@ $(VENV)/.installed-core

install: $(VENV)/.installed-core
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed-core
	$(PY) -m alignjax.main --config=experiments/quickstart.py --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check alignjax tests experiments bench launch
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: $(VENV)/.installed-test
	$(PY) bench/dpo_step.py

# Writes notebooks/*.ipynb from notebooks/make_notebooks.py and executes each in place (outputs stored).
notebooks: $(VENV)/.installed-test
	$(PY) notebooks/make_notebooks.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
