# make train   set up the virtualenv and train + score the embedded default (CPU, offline)
# make test    set up the virtualenv and run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test test-slow bench clean

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
	rm -rf outputs multirun .pytest_cache
