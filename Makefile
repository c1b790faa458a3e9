# The two commands a stranger needs: `make demo` and `make test`. Both create (or reuse)
# the virtual environment in .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ORCH   := $(VENV)/bin/orch
DEMO   ?= demo

.PHONY: demo test lint bench faults clean

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,trainer]'
	touch $@

## demo: the whole loop on the local target (deploy.yaml), on a SYNTHETIC data set
demo: $(VENV)/.installed
	$(PY) -m trainer synth $(DEMO)/data --n 1500 --seed 0
	$(PY) -m trainer check-data $(DEMO)/data
	$(ORCH) deploy --sync-data --follow
	$(ORCH) download --best
	$(ORCH) resume --epochs 5 --follow
	$(ORCH) runs

## test: the whole test suite (unit + integration). Two workers, a test file each at a time (its
## shared servers and trained runs stay in one process): 19 min on 2 idle cores for 705 tests,
## 31 min beside `stress-ng --cpu 2` (up to 41 min beside heavier jobs; a third worker
## did not make it shorter: the suite's long tail is a few trainer-heavy files).
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

## bench: every benchmark (each prints ratios against its named baseline; ~1.5 hours on 2 cores, bench_train most of it)
bench: $(VENV)/.installed
	$(PY) bench/bench_load.py
	$(PY) bench/bench_train.py --seeds 2
	$(PY) bench/bench_sync.py
	$(PY) bench/bench_download.py
	$(PY) bench/bench_logs.py
	$(PY) bench/bench_monitor.py

## faults: SIGKILL the trainer hundreds of times (KILLS=300) and check every guarantee (~50 min on 2 cores)
KILLS ?= 300
faults: $(VENV)/.installed
	$(PY) bench/bench_faults.py --kills $(KILLS)

clean:
	rm -rf $(DEMO) artifacts .pytest_cache
