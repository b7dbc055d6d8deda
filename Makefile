# make test        set up (Python env, torch, dev dependencies), build, run the test suite
# make test-cpu    the same, built without the CUDA kernels (XENT_FORCE_CPU=1): no GPU here
# make bench       set up, build, compare against F.cross_entropy and its peers
# make lint        ruff (Python) and clang-format (C++/CUDA)
# make which-python  the Python and torch the other targets use, and why
#
# Python and torch (tools/pick_python.sh decides, the first that applies):
#   PYTHON=...            that interpreter, used as it is (it must have torch)
#   an active venv        ($VIRTUAL_ENV) whose python has torch: used directly
#   the project's venv    ($(VENV)) once it exists
#   python3 with torch    used directly when it runs in a venv, else $(VENV) is created with
#                         --system-site-packages so that it sees that torch
#   none of these         $(VENV) is created and $(TORCH_SPEC) installed, the torch CI tests
# No second torch is installed where one is found. The test and bench dependencies
# (requirements-dev.txt) go into the environment chosen.
#
# Builds are incremental: build/make/built records what the last build was made for; while
# no source changed and the interpreter, torch and build options are the same, pip is not run.
# Otherwise ninja recompiles only the sources that changed, showing each step.

VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=

PICK := $(shell sh tools/pick_python.sh '$(VENV)' \
          '$(if $(filter command line environment,$(origin PYTHON)),$(PYTHON))')
HOW := $(word 1,$(PICK))
ifneq ($(filter given active direct,$(HOW)),)
  PY := $(word 2,$(PICK))
else
  PY := $(VENV)/bin/python
endif

STAMPS := build/make
DEPS := $(STAMPS)/deps-$(shell printf '%s' '$(PY)' | cksum | cut -d' ' -f1)
BUILT := $(STAMPS)/built
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
# What a build is made for; recursive (=): in the recipe it reads the torch installed by then.
BUILD_KEY = $(PY) torch=$(shell $(PY) -c 'import importlib.metadata as m; \
  print(m.version("torch"))' 2>/dev/null) cpu=$(XENT_FORCE_CPU) require=$(XENT_REQUIRE_CUDA) \
  archs=$(TORCH_CUDA_ARCH_LIST) cuda_home=$(CUDA_HOME)
ifneq ($(strip $(BUILD_KEY)),$(strip $(shell cat $(BUILT) 2>/dev/null)))
  REBUILD := FORCE
endif
ifeq ($(wildcard xent_ext/_C*.so),)
  REBUILD := FORCE
endif

ifneq ($(filter share fresh project,$(HOW)),)
  INSTALL_TORCH = $(PY) -m pip install "$(TORCH_SPEC)"
else
  INSTALL_TORCH = { echo "make: $(PY) has no torch: install one into it (pip install \
    $(TORCH_SPEC)), or leave PYTHON unset to use the project's venv"; exit 1; }
endif
# Scripts of the chosen environment (ruff, clang-format).
BIN = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

.PHONY: setup build test test-cpu bench lint format gpu-check which-python uninstall clean FORCE

which-python:
	@case "$(HOW)" in \
	  error) echo "make: $(wordlist 2,99,$(PICK))"; exit 1;; \
	  given) echo "$(PY): given as PYTHON";; \
	  active) echo "$(PY): the active virtual environment's";; \
	  project) echo "$(PY): the project's venv";; \
	  direct) echo "$(PY): python3, in a venv of its own";; \
	  share) echo "$(PY): to be created, seeing python3's torch (--system-site-packages)";; \
	  fresh) echo "$(PY): to be created, with $(TORCH_SPEC) (no torch found)";; \
	esac
	@if [ -x "$(PY)" ] || command -v "$(PY)" >/dev/null; then \
	  $(PY) -c 'import importlib.metadata as m; print("torch", m.version("torch"))' \
	    2>/dev/null || echo "torch: none yet, $(TORCH_SPEC) would be installed"; fi

setup: $(DEPS)

ifeq ($(HOW),share)
$(VENV)/bin/python:
	@echo "make: python3 has torch; creating $(VENV), which sees it (--system-site-packages)"
	python3 -m venv --system-site-packages $(VENV)
else ifeq ($(HOW),fresh)
$(VENV)/bin/python:
	@echo "make: no torch in the active venv or python3; creating $(VENV) with $(TORCH_SPEC)"
	python3 -m venv $(VENV)
endif

$(DEPS): requirements-dev.txt $(if $(filter share fresh,$(HOW)),$(VENV)/bin/python)
	@if [ "$(HOW)" = error ]; then echo "make: $(wordlist 2,99,$(PICK))"; exit 1; fi
	@$(PY) -c 'import torch' 2>/dev/null || $(INSTALL_TORCH)
	@echo "make: installing the test and bench dependencies (requirements-dev.txt) for $(PY)"
	$(PY) -m pip install -q -r requirements-dev.txt
	@mkdir -p $(@D) && touch $@

build: $(BUILT)

$(BUILT): $(SOURCES) $(DEPS) $(REBUILD)
	@PIP_ROOT_USER_ACTION=ignore MAX_JOBS=$(MAX_JOBS) $(PY) tools/build_progress.py \
	  $(PY) -m pip install -v --no-build-isolation --no-deps -e .
	@echo '$(BUILD_KEY)' > $@

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Without a GPU the CUDA kernels cannot run here: skip their compile (minutes).
test-cpu:
	@$(MAKE) --no-print-directory test XENT_FORCE_CPU=1

bench: build
	$(PY) -m bench $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check xent_ext tests bench examples tools setup.py
	$(BIN)/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: setup
	$(BIN)/ruff check --fix xent_ext tests bench examples tools setup.py
	$(BIN)/clang-format -i $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# On a GPU machine: build, CUDA tests, compute-sanitizer, GPU bench; logs under OUT. The script
# builds in place for this card's architecture only, so the next `make build` builds again.
gpu-check: setup
	PYTHON=$(PY) bash bench/gpu_check.sh $(or $(OUT),gpu-check-logs); \
	  rc=$$?; rm -f $(BUILT); exit $$rc

uninstall:
	-$(PY) -m pip uninstall -y xent_ext
	rm -f $(BUILT)

clean:
	rm -rf build *.egg-info xent_ext/*.so xent_ext/_build_info.py
