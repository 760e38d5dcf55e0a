# A fresh machine needs only `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lo_ops-installed
SOURCES := $(shell find csrc lo_ops meta_kernels -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py') setup.py pyproject.toml

.PHONY: setup build demo test bench clean cuda-build

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Only what is missing is installed: torch==2.13.0 (the CPU build) when no torch is importable,
# so a machine with its own torch (a GPU image) keeps it and needs no network.
# module:package; scikit-learn and matplotlib are the demo's (the `examples` extra), not the
# optimizers' dependencies.
BASE_DEPS := safetensors:safetensors huggingface_hub:huggingface_hub msgpack:msgpack pytest:pytest \
             numpy:numpy ninja:ninja
DEPS := $(BASE_DEPS) sklearn:scikit-learn matplotlib:matplotlib
# The tests' own: the frameworks lo_ops.integrations is tested against, property-based and
# golden tests. Installed against the torch already there (a constraint), never replacing it.
TEST_DEPS := transformers:transformers accelerate:accelerate lightning:lightning \
             hypothesis:hypothesis expecttest:expecttest yaml:pyyaml
# mup declares torchvision (and plotting packages) as requirements, but `import mup` needs only
# torch and yaml; a torchvision wheel built for another torch breaks transformers and lightning.
TEST_DEPS_NO_DEPS := mup:mup
TEST_STAMP := $(VENV)/.lo_ops-test-deps
# $(call install_deps,PYTHON,DEPS[,PIP_FLAGS]): install the packages of DEPS that PYTHON cannot
# import (never replacing the torch it has), and setuptools>=64 and wheel.
define install_deps
	@missing=""; for d in $(2); do $(1) -c "import $${d%%:*}" 2>/dev/null || missing="$$missing $${d#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; c=$$(mktemp); \
	  $(1) -c "import torch; print('torch==' + torch.__version__)" > $$c 2>/dev/null || : > $$c; \
	  $(1) -m pip install $(3) -c $$c $$missing; rc=$$?; rm -f $$c; exit $$rc; fi
	$(1) -c "import setuptools, wheel, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
	  || $(1) -m pip install "setuptools>=64" wheel
endef
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(call install_deps,$(PY),$(DEPS))
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: setup

demo: setup
	$(PY) -m lo_ops demo

$(TEST_STAMP): $(STAMP)
	$(call install_deps,$(PY),$(TEST_DEPS))
	$(call install_deps,$(PY),$(TEST_DEPS_NO_DEPS),--no-deps)
	touch $(TEST_STAMP)

test: setup $(TEST_STAMP)
	$(PY) -m pytest -q tests

bench: setup
	$(PY) perf/bench_step.py

# `make cuda-build` (not part of `make test`; needs nvcc, not a GPU): a separate venv with a CUDA
# build of torch (an install of several GB), the extension built there with its CUDA kernels, and
# a check that every op has a CUDA kernel registered. .venv and the in-place lo_ops/_C*.so are left
# alone: the build goes to $(CUDA_BUILD) and is installed (not editable) into $(CUDA_VENV).
# CUDA_HOME defaults to the toolkit that the nvcc on PATH belongs to, as nvcc itself reports it
# (so a wrapper script that execs another nvcc is followed); TORCH_CUDA_ARCH_LIST, when not set,
# is setup.py's default.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_BUILD ?= build/cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_HOME ?= $(shell nvcc --dryrun -x cu -E /dev/null 2>&1 | sed -n 's|^#\$$ _HERE_=\(.*\)/bin/*$$|\1|p' | head -n 1)
CUDA_OPS := small_fc_lopt_step_ velo_lstm_input velo_step_ factored_gsq_sums factored_update_ \
            small_fc_lopt_feature_sums_ small_fc_lopt_apply_ velo_feature_sums_ velo_apply_ \
            velo_lstm_moments velo_lstm_rows celo_adam_step_

cuda-build:
	@[ -n "$(CUDA_HOME)" ] || { echo "cuda-build: no nvcc on PATH; set CUDA_HOME to the CUDA toolkit root (e.g. /usr/local/cuda-13.0)"; exit 1; }
	@echo "CUDA_HOME=$(CUDA_HOME)"
	[ -x $(CUDA_PY) ] || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || $(CUDA_PY) -m pip install $(CUDA_TORCH)
	$(call install_deps,$(CUDA_PY),$(BASE_DEPS))
	mkdir -p $(CUDA_BUILD)
	printf '[build]\nbuild_base = %s\n[egg_info]\negg_base = %s\n' "$(abspath $(CUDA_BUILD))" "$(abspath $(CUDA_BUILD))" \
	  > $(CUDA_BUILD)/build.cfg
	PATH="$(abspath $(CUDA_VENV))/bin:$$PATH" DIST_EXTRA_CONFIG="$(abspath $(CUDA_BUILD))/build.cfg" \
	  LO_OPS_BUILD_CUDA=1 CUDA_HOME="$(CUDA_HOME)" \
	  $(CUDA_PY) -m pip install --no-build-isolation --no-deps --force-reinstall .
	cd $(CUDA_VENV) && bin/python -c "import sys, torch, lo_ops; \
	  print('torch', torch.__version__, 'CUDA', torch.version.cuda); print('lo_ops from', lo_ops.__file__); \
	  assert 'site-packages' in lo_ops.__file__, 'lo_ops was not imported from the venv'; \
	  missing = [op for op in '$(CUDA_OPS)'.split() if not lo_ops.has_kernel(op, 'cuda')]; \
	  [print(op, 'has a CUDA kernel:', op not in missing) for op in '$(CUDA_OPS)'.split()]; \
	  sys.exit(f'no CUDA kernel registered for {missing}' if missing else 0)"

clean:
	rm -rf build *.egg-info lo_ops/_C*.so $(STAMP)
