# A fresh machine needs only `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lo_ops-installed
SOURCES := $(shell find csrc lo_ops meta_kernels -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py') setup.py pyproject.toml

.PHONY: setup build demo test bench clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch==2.13.0 is installed only when no torch is importable (a GPU machine keeps its own).
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=64" wheel ninja numpy pytest "safetensors>=0.4.3" "huggingface_hub>=0.23"
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: setup

demo: setup
	$(PY) -m lo_ops demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) perf/bench_step.py

clean:
	rm -rf build *.egg-info lo_ops/_C*.so $(STAMP)
