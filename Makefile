# `make demo`: set up .venv and run the full pipeline on synthetic phantoms.
# `make test`: set up .venv and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch, pinned so the install never pulls a multi-GB CUDA wheel.
TORCH := torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,notebook]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/volseg demo --output demo

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo runs
