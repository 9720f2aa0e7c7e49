# `make run` runs the demo pipeline, `make test` the tests; both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitpipe-installed
CONFIG ?= pipelines/configs/demo.yaml
PYTEST_ARGS ?=
# DeepSpeed JIT-builds a CPU op on first use; keep it with this checkout's venv (a cache shared by several
# checkouts' venvs is rebuilt each time another venv uses it).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions
# ... and build it with this venv's ninja in every process (tests put the venv's bin first on PATH for the Ray
# jobs and servers they start): the system's ninja 1.11 and the venv's 1.13 hash commands differently in the
# shared .ninja_log, so each one rebuilt the op after the other (two rebuilds, ~130 CPU-s, in every test run).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(VENV)/bin/vitpipe run $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) tests/parallel.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf vitpipe-work
