# make test   set up (venv, torch, dev dependencies, build) and run the test suite
# make bench  set up and run the comparison against F.cross_entropy and its peers
# make lint   ruff (Python) and clang-format (C++/CUDA)
#
# Set-up: .venv is created on first use.  If the active python3 already imports torch, the venv
# sees it (--system-site-packages) and no other torch is installed; otherwise TORCH_SPEC is
# installed into the venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
MAX_JOBS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup build test bench lint format gpu-check clean

setup: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "Using the torch of $(PYTHON) (venv with system site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

build: setup
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) -m bench $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check xent_ext tests bench setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: setup
	$(VENV)/bin/ruff check --fix xent_ext tests bench setup.py
	$(VENV)/bin/clang-format -i $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# On a GPU machine: build, CUDA tests, compute-sanitizer, GPU bench; logs under OUT.
gpu-check:
	bash bench/gpu_check.sh $(or $(OUT),gpu-check-logs)

clean:
	rm -rf build *.egg-info xent_ext/*.so
