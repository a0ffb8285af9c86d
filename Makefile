# Fresh-machine entry points. `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench

install: $(VENV)/.installed

# CPU machines get the CPU torch wheel first (otherwise pip pulls a multi-GB CUDA build);
# a torch that is already installed (e.g. a CUDA build on a GPU machine) is kept.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
		else $(BIN)/pip install -q torch==2.13.0; fi
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/comet-ds demo --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/comet-ds bench forward --lengths 4k,32k,256k
