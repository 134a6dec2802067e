# make train   set up the virtualenv and train + score the embedded default (CPU, offline)
# make test    set up the virtualenv and run the test suite (what CI runs)
# make clean   remove caches; trained runs (outputs/) and datasets and feature stores (data/) are kept
VENV ?= .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test test-slow clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip "setuptools>=77.0.3,<81" wheel
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m captioner.train $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(ARGS)

clean:
	rm -rf .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "kept outputs/ (trained runs, checkpoints) and data/ (datasets, feature stores): remove them yourself if you mean to"
