# Developer shortcuts. `make docs` builds the documentation site into build/site/ (strict: warnings fail).
PYTHON ?= python

.PHONY: docs docs-install docs-serve docs-test test lint

# torch is pinned first (as in the README) so that installing the package never pulls a CUDA build.
docs-install:
	$(PYTHON) -m pip install torch==2.13.0 && $(PYTHON) -m pip install -e '.[docs]'

docs:
	@$(PYTHON) -c "import mkdocs, mkdocstrings, material" 2>/dev/null || $(MAKE) docs-install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

docs-serve:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve --strict

docs-test:
	$(PYTHON) -m pytest -q tests/docs

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
