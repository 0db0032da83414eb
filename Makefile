# Fresh-machine entry points. Each target sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject.toml) so that installs on the CPU-only
# development machines take the local CPU wheel instead of a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup run test lint bench fuzz clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)" || $(BIN)/pip install --quiet "torch>=2.4"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

## The main job: the quick LoCo-RLHF experiment (table + plot in runs/quick).
run: setup
	$(BIN)/pluralign run --out runs/quick

## The test suite (what CI runs).
test: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks

## Fuzz every loader, config resolver and saved-model reader (FUZZ_CASES in total); prints,
## per target, the cases, clean errors and escapes, and fails if anything escaped.
FUZZ_CASES ?= 12000
fuzz: setup
	cd tests && ../$(BIN)/python -m fuzzing --cases $(FUZZ_CASES)

clean:
	rm -rf $(VENV) runs
