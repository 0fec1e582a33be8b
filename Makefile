# Two commands on a fresh machine:
#   make demo   set up .venv, build the tiny artifact, register it in ./mlflow.db, score samples
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml MLmodel_template/requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exact: the local CPU wheel; a loose torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# then the project, with the tested versions (constraints.txt) of what requirements.txt gives as ranges
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) samples/demo.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf mlruns mlflow.db demo_output
