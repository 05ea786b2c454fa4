# `make demo`, `make test`, `make bench` and `make serve` each set up their own environments on a fresh machine:
# $(VENV) for the project, $(TRITON_VENV) for the Triton server (its Python backend stub needs numpy < 2).
PYTHON ?= python3
VENV ?= .venv
TRITON_VENV ?= .venv-triton
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/l2c-export
DEMO := engines/demo
DIGITS := 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9

.PHONY: setup triton-env demo test bench serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The Triton server's environment: nvidia-pytriton (the real tritonserver), numpy < 2, ONNX Runtime, and l2c-export
# itself without its dependencies (the Triton model imports no torch).
triton-env: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: requirements-triton.txt setup.py
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-triton.txt
	$(TRITON_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The main job on the embedded default: its schedule, one ONNX graph per subset, then sampling on ONNX Runtime.
demo: setup
	$(CLI) schedule --schedule l2c_export/default/schedule.json --png $(DEMO)/schedule.png
	$(CLI) build --out $(DEMO)/engines
	$(CLI) verify $(DEMO)/engines
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --full --out $(DEMO)/samples-full.png
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --compare-full --out $(DEMO)/samples-l2c.png
	@echo "demo: $(DEMO)/samples-l2c.png (L2C schedule), $(DEMO)/samples-full.png (every sub-layer), $(DEMO)/schedule.png"

test: setup triton-env
	$(PY) -m pytest -q tests

# Figures for the README: docs/bench.json, docs/bench.md, docs/bench.png (a few minutes on 2 cores).
bench: setup triton-env
	$(PY) -m l2c_export.bench_suite --work engines/bench --docs docs

# The embedded default on Triton Inference Server, on 127.0.0.1:8000 (HTTP), 8001 (gRPC), 8002 (metrics).
serve: setup triton-env
	$(CLI) build --out $(DEMO)/engines
	$(CLI) triton $(DEMO)/engines --repo $(DEMO)/triton
	$(CLI) serve $(DEMO)/triton --env $(TRITON_VENV)

clean:
	rm -rf $(VENV) $(TRITON_VENV) engines/demo engines/bench .pytest_cache
