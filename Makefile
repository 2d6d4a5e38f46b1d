# `make demo`: set up .venv and run the full pipeline on synthetic phantoms.
# `make test`: set up .venv and run the test suite; `make test-fast`: the edit-loop tier (not slow).
# `make lint`: import layers, ruff, mypy and the docs site, as CI runs them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the version the project is tested with. The pin alone does NOT choose a
# CPU build: pip takes the first matching wheel it finds. On the development machine pip is
# configured (find-links) with a local 2.13.0+cpu wheel, so it gets that one. Anywhere else
# `torch==2.13.0` comes from PyPI, and on Linux x86_64 that is a CUDA build (several GB with
# its nvidia-* dependencies); macOS and Windows wheels from PyPI are CPU-only anyway.
# For a CPU-only torch on Linux, point pip at PyTorch's CPU index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (the same as `pip install torch --index-url https://download.pytorch.org/whl/cpu`; on an
# existing .venv run `make clean` first, or that pip command inside it).
TORCH := torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test test-fast lint clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test,notebook,dev,viewer,dicom]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/volseg demo --output demo

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check volseg tests benchmarks docs
	$(BIN)/mypy
	$(BIN)/python docs/gen_config_reference.py --check
	$(BIN)/mkdocs build --strict --quiet -d $(VENV)/site

clean:
	rm -rf $(VENV) demo runs
