# Quick start: `make run` and `make test` work on a fresh machine: they create .venv and install what they need
# (every optional extra included: lm-eval, gguf, plots, vision).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test test-fast lint benchmark clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[all,test]"
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/prune run recipes/default.yaml --overwrite

test: $(INSTALLED) lint
	$(PYTHON) -m pytest -q

# The unit subset: no test on the real SmolLM2-135M (integration) and none marked slow.
test-fast: $(INSTALLED)
	$(PYTHON) -m pytest -q -m "not integration and not slow"

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmark: $(INSTALLED)
	$(PYTHON) benchmarks/oneshot.py

clean:
	rm -rf $(VENV) runs
