# The two quick-start commands of the README: `make demo` and `make test`.
# Run from an activated virtual environment (or a conda environment), they install
# into it. Run from anywhere else (a system Python, which may refuse `pip install`
# under PEP 668), they create ./.venv once and use it. PYTHON overrides the choice.
INVENV := $(shell python3 -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ))' 2>/dev/null)
VENV :=
ifeq ($(origin PYTHON),undefined)
ifeq ($(INVENV),1)
PYTHON := python3
else
PYTHON := .venv/bin/python
VENV := .venv/bin/python
endif
endif
# kronfluence declares torchvision but never imports it; installing it without
# dependencies keeps pip from pulling a CUDA build of torch (see pyproject's test extra).
KRONFLUENCE ?= kronfluence==1.0.1

.PHONY: install install-test demo test

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip

install: $(VENV)
	$(PYTHON) -m pip install -q -e .

install-test: $(VENV)
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps $(KRONFLUENCE)

demo: install
	$(PYTHON) -m jaxinf demo

# The formatter, the linter and the type checker first (pyproject's [tool.ruff] and [tool.mypy]: zero findings), then the tests,
# on TEST_WORKERS processes (default 2), each taking whole files so a module's fixtures are built once. Most
# of a test's time is single-threaded (tracing, compiling, Python), so two workers use two cores.
TEST_WORKERS ?= 2
test: install-test
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile
