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

# Only what is missing is installed: torch==2.13.0 (the CPU build) when no torch is importable,
# so a machine with its own torch (a GPU image) keeps it and needs no network.
# module:package; scikit-learn and matplotlib are the demo's (the `examples` extra), not the
# optimizers' dependencies.
DEPS := safetensors:safetensors huggingface_hub:huggingface_hub msgpack:msgpack pytest:pytest \
        numpy:numpy ninja:ninja sklearn:scikit-learn matplotlib:matplotlib
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@missing=""; for d in $(DEPS); do $(PY) -c "import $${d%%:*}" 2>/dev/null || missing="$$missing $${d#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(PIP) install $$missing; fi
	$(PY) -c "import setuptools, wheel, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
	  || $(PIP) install "setuptools>=64" wheel
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
