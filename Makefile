# Fresh-machine entry points. `make demo` and `make test` create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the torch build installed on CPU machines: the newest release tested, inside setup.cfg's supported range
TORCH_CPU := 2.13.0

.PHONY: install demo test lint bench

install: $(VENV)/.installed

# CPU machines get the CPU torch wheel first (otherwise pip pulls a multi-GB CUDA build); GPU machines
# get torch from setup.cfg's range with the package. A torch already installed inside that range is kept.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || command -v nvidia-smi >/dev/null 2>&1 || \
		$(BIN)/pip install -q torch==$(TORCH_CPU)
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
