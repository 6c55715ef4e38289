# The two quick-start commands of the README: `make demo` and `make test`.
# Both install into the Python environment you run them from (use a virtual
# environment). PYTHON selects the interpreter.
PYTHON ?= python3
# kronfluence declares torchvision but never imports it; installing it without
# dependencies keeps pip from pulling a CUDA build of torch (see pyproject's test extra).
KRONFLUENCE ?= kronfluence==1.0.1

.PHONY: install install-test demo test

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps $(KRONFLUENCE)

demo: install
	$(PYTHON) -m jaxinf demo

test: install-test
	$(PYTHON) -m pytest
