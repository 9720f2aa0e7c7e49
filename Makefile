# `make run` runs the demo pipeline, `make test` the tests; both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitpipe-installed
CONFIG ?= pipelines/configs/demo.yaml
PYTEST_ARGS ?=
# An op DeepSpeed JIT-builds is kept with this checkout's venv and built with its ninja in every process (the
# system's ninja and the venv's hash commands differently in one .ninja_log and rebuild each other's). vitpipe's
# training builds none: cluster/train.py turns off the CPU inference op DeepSpeed would otherwise compile.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions
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
