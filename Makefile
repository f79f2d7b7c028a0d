# make test / make bench create .venv on first use and install the package with every
# extra (tests compare against the same peers the benchmarks time).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
K ?=
PYTEST_ARGS ?=

.PHONY: test bench lower lint format clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

# Interpret-mode kernel tests, model tests and lowering checks, with line coverage.
test: $(STAMP)
	$(PY) -m pytest --cov=capibara --cov=kernels --cov-report=term $(if $(K),-k '$(K)') $(PYTEST_ARGS)

# Benchmarks (pytest-benchmark cases in benchmarks/bench_*.py) -> one table + JSON.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(if $(K),-k '$(K)')

# TPU lowering of every Pallas kernel from this host.
lower: $(STAMP)
	$(PY) -m kernels.lowering

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .coverage htmlcov .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
