# The two commands a new machine needs: `make demo` and `make test`. Everything runs from a local virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned here (this machine's CPU wheel), not in setup.cfg: a pin there would replace a user's CUDA torch.
TORCH ?= torch==2.13.0

install: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python tools/demo.py

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) work_dirs demo_out .pytest_cache
