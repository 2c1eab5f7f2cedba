# Quick start: `make run` and `make test` work on a fresh machine: they create .venv and install what they need.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint benchmark clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/prune run recipes/default.yaml --overwrite

test: $(INSTALLED) lint
	$(PYTHON) -m pytest -q

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(INSTALLED)
	$(PYTHON) benchmarks/oneshot.py

clean:
	rm -rf $(VENV) runs
