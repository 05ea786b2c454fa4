# `make demo` and `make test` each set up their own environment in $(VENV) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/l2c-export
DEMO := engines/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(CLI) schedule --schedule l2c_export/default/schedule.json --png $(DEMO)/schedule.png
	$(CLI) sample --full --out $(DEMO)/samples-full.png --labels 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9 --seed 1
	$(CLI) sample --out $(DEMO)/samples-l2c.png --labels 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9 --seed 1
	@echo "demo: $(DEMO)/samples-full.png (every sub-layer) and $(DEMO)/samples-l2c.png (the L2C schedule)"

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) engines/demo .pytest_cache
