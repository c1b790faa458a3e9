# The two commands a stranger needs: `make demo` and `make test`. Both create (or reuse)
# the virtual environment in .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,trainer]'
	touch $@

## demo: SYNTHETIC data -> check it -> train on the local target
demo: $(VENV)/.installed
	$(PY) -m trainer synth $(DEMO)/data --n 1000 --seed 0
	$(PY) -m trainer check-data $(DEMO)/data

## test: the whole test suite (unit + integration)
test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO) artifacts .pytest_cache
