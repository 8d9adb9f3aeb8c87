# Two entry points for a fresh machine (see README): `make demo` (the main job) and `make test`.
# Both create or reuse the project-local virtual environment in .venv/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-compiles its CPU comm op on first use; keep it with the venv so it is built once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export HF_HUB_OFFLINE := 1

# The Python sources of the pinned kernel packages (the cuda extra), for
# tests/unit/dimsum/ssm/test_kernel_contract.py: no CUDA build, and no prebuilt-wheel download (their setup.py
# tries one unless FORCE_BUILD is set).
UPSTREAM_KERNEL_SOURCES := MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE

.PHONY: setup demo test lint

setup: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(UPSTREAM_KERNEL_SOURCES) $(BIN)/pip install --quiet --no-deps --no-build-isolation \
		"mamba-ssm==2.3.2.post1" "causal-conv1d==1.7.0"
	$(BIN)/python -m launch.train.distributed --prebuild
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dimsum demo

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]), see docs/architecture.md
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo

test: lint
	$(BIN)/python -m pytest
