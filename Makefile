# Two entry points for a fresh machine (see README): `make demo` (the main job) and `make test`.
# Both create or reuse the project-local virtual environment in .venv/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed JIT-compiles its CPU comm op on first use; keep it with the venv so it is built once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint

setup: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m launch.distributed --prebuild
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dimsum demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest
