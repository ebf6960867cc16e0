# Set-up and entry points. `make demo` and `make test` each create (or reuse) the virtual environment.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# extra pip arguments for the torch install, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test docs docs-inventories clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the constraint, so that nothing later resolves another build; TORCH_PIP_ARGS picks its index
	$(BIN)/pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -e ".[tests,plots,safety-gym,several-costs,tensorboard,benchmarks]"
	$(BIN)/pip install --no-deps safety-gymnasium==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check sb3_metacpo tests examples benchmarks
	$(BIN)/ruff format --check sb3_metacpo tests examples benchmarks
	$(BIN)/mypy sb3_metacpo
	$(BIN)/sphinx-build -W -q -b html docs docs/_build/html
	$(BIN)/python -m pytest tests -ra

# the docs (the tests extra installs what they need), warnings as errors; open docs/_build/html/index.html
docs: $(STAMP)
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

# refresh the intersphinx inventories committed under docs/_intersphinx (needs the network; the build reads them offline)
docs-inventories:
	bash docs/_intersphinx/fetch.sh

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
