# Two commands matter: `make demo` and `make test`. Both build .venv from nothing when it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; a GPU user installs a CUDA build into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
SHARED ?= $(or $(WSIUDA_SHARED),../shared)
DEMO_SLIDE ?= $(SHARED)/slides/CMU-1-Small-Region.svs
DEMO_OUT ?= demo

.PHONY: demo test test-slow lint install clean

$(BIN)/.deps-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(FIND_LINKS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(FIND_LINKS) -e ".[dev]" --config-settings editable_mode=strict
	touch $@

# Strict editable mode links each file into build/, so new modules need a (fast, offline) reinstall.
install: $(BIN)/.deps-stamp
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

lint: install
	$(BIN)/ruff check wsiuda cli pipelines tests benchmarks examples
	$(BIN)/ruff format --check wsiuda cli pipelines
	# mypy reads the installed link tree, where cli/ and pipelines/ appear as wsiuda.cli and wsiuda.pipelines.
	$(BIN)/mypy --config-file pyproject.toml build/__editable__.wsiuda-*/wsiuda

test: lint
	WSIUDA_SHARED=$(SHARED) $(BIN)/pytest -m "not slow" -q

test-slow: install
	WSIUDA_SHARED=$(SHARED) $(BIN)/pytest -m slow -q

demo: install
	$(BIN)/python examples/demo.py --slide "$(DEMO_SLIDE)" --out "$(DEMO_OUT)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
