# `make demo`, `make test` and `make bench` each set up their own environment in $(VENV) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/l2c-export
DEMO := engines/demo
DIGITS := 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The main job on the embedded default: its schedule, one ONNX graph per subset, then sampling on ONNX Runtime.
demo: setup
	$(CLI) schedule --schedule l2c_export/default/schedule.json --png $(DEMO)/schedule.png
	$(CLI) build --out $(DEMO)/engines
	$(CLI) verify $(DEMO)/engines
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --full --out $(DEMO)/samples-full.png
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --compare-full --out $(DEMO)/samples-l2c.png
	@echo "demo: $(DEMO)/samples-l2c.png (L2C schedule), $(DEMO)/samples-full.png (every sub-layer), $(DEMO)/schedule.png"

test: setup
	$(PY) -m pytest -q tests

# Figures for the README: docs/bench.json, docs/bench.md, docs/bench.png (a few minutes on 2 cores).
bench: setup
	$(PY) -m l2c_export.bench_suite --work engines/bench --docs docs

clean:
	rm -rf $(VENV) engines/demo engines/bench .pytest_cache
