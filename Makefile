# The README's two newcomer commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null 2>&1 || { echo "error: Java (17 or newer) is required by Spark but 'java' is not on PATH; install a JDK 17 (e.g. apt-get install openjdk-17-jre-headless) and retry" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,plot,bench]'
	@# fill numba's cache now: otherwise the first search compiles its kernels for ~20-30 s
	$(PY) -m batch_index warm
	touch $@

setup: $(VENV)/.installed

## Everything embedded on this machine: broker, synthetic corpus, index, streaming job, queries.
demo: setup
	$(PY) -m streaming demo

## The whole test suite (unit, Spark local mode, integration against an embedded Kafka-protocol broker).
test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check batch_index streaming schemas bench tests tools

## Benchmarks (on demand, never in the test suite; about 1.5 h on 2 cores); results land in bench/results/.
bench: setup
	$(PY) -m bench recall
	$(PY) -m bench scaling --engine spark
	$(PY) -m bench e2e
	$(PY) -m bench distributed

clean:
	rm -rf $(VENV) .pytest_cache
