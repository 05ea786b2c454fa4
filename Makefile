# `make demo`, `make test`, `make bench` and `make serve` each set up their own environments on a fresh machine:
# $(VENV) for the project, $(TRITON_VENV) for the Triton server (its Python backend stub needs numpy < 2).
PYTHON ?= python3
VENV ?= .venv
TRITON_VENV ?= .venv-triton
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/l2c-export
DEMO := engines/demo
DIGITS := 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9
# The text-to-image demo's prompts, one a line: every digit, the caption forms in turn (the last three held out of
# t2i-digits' training).
T2I_PROMPTS := "a handwritten zero" "the digit 1" "number two" "a picture of the digit three" "4" \
	"an image of a handwritten 5" "the handwritten number six" "the number 7" "a handwritten digit eight" \
	"a picture of a 9"

.PHONY: setup triton-env demo test test-fast bench bench-large serve clean cpp cpp-deps cpp-asan cpp-asan-test

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

# The main job on the embedded models: the digits DiT (DDIM), the digits U-ViT (DPM-Solver-2S), the text-to-image
# t2i-digits (PixArt-α, DPM-Solver++; prompts in, images out) and the text-to-video t2v-digits (Wan2.1, UniPC; prompts
# in, clips out). For each, its schedule, one ONNX graph per subset, every graph verified against PyTorch, then
# sampling on ONNX Runtime with full compute and with the schedule.
demo: setup
	$(CLI) schedule --schedule l2c_export/demo/dit-digits/schedule.json --png $(DEMO)/schedule.png
	$(CLI) build --out $(DEMO)/engines
	$(CLI) verify $(DEMO)/engines
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --full --out $(DEMO)/samples-full.png
	$(CLI) run $(DEMO)/engines --labels $(DIGITS) --seed 1 --compare-full --out $(DEMO)/samples-l2c.png
	$(CLI) schedule --model uvit-digits --schedule l2c_export/demo/uvit-digits/schedule.json --png $(DEMO)/uvit-schedule.png
	$(CLI) build --model uvit-digits --out $(DEMO)/uvit-engines
	$(CLI) verify $(DEMO)/uvit-engines
	$(CLI) run $(DEMO)/uvit-engines --labels $(DIGITS) --seed 1 --full --out $(DEMO)/uvit-samples-full.png
	$(CLI) run $(DEMO)/uvit-engines --labels $(DIGITS) --seed 1 --compare-full --out $(DEMO)/uvit-samples-l2c.png
	$(CLI) schedule --model t2i-digits --schedule l2c_export/demo/t2i-digits/schedule.json --png $(DEMO)/t2i-schedule.png
	$(CLI) build --model t2i-digits --out $(DEMO)/t2i-engines
	$(CLI) verify $(DEMO)/t2i-engines --diffusers l2c_export/demo/t2i-digits
	printf '%s\n' $(T2I_PROMPTS) > $(DEMO)/t2i-prompts.txt
	$(CLI) run $(DEMO)/t2i-engines --prompts $(DEMO)/t2i-prompts.txt --seed 1 --full --out $(DEMO)/t2i-samples-full.png
	$(CLI) run $(DEMO)/t2i-engines --prompts $(DEMO)/t2i-prompts.txt --seed 1 --compare-full --out $(DEMO)/t2i-samples-l2c.png
	$(CLI) schedule --model t2v-digits --schedule l2c_export/demo/t2v-digits/schedule.json --png $(DEMO)/t2v-schedule.png
	$(CLI) build --model t2v-digits --out $(DEMO)/t2v-engines
	$(CLI) verify $(DEMO)/t2v-engines
	$(PY) -m l2c_export.demo.t2v clips $(DEMO)/t2v-engines --seed 1 --out $(DEMO)/t2v-clips.gif
	@echo "demo: DiT $(DEMO)/samples-l2c.png (L2C schedule), $(DEMO)/samples-full.png (every sub-layer), $(DEMO)/schedule.png"
	@echo "demo: U-ViT $(DEMO)/uvit-samples-l2c.png, $(DEMO)/uvit-samples-full.png, $(DEMO)/uvit-schedule.png"
	@echo "demo: text to image $(DEMO)/t2i-samples-l2c.png, $(DEMO)/t2i-samples-full.png (prompts: $(DEMO)/t2i-prompts.txt)"
	@echo "demo: text to video $(DEMO)/t2v-clips.gif (full compute above, the L2C schedule below), $(DEMO)/t2v-schedule.png"

# The suite in tiers (tests/conftest.py marks each test from the fixtures it uses): `make test` runs every tier,
# `make test-fast` the fast one (no Triton, no C++ build, no slow round trip; its set-up is the project venv only).
# Both on pytest-xdist workers, one per core (each with its share of the threads); the 15 slowest tests print last.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
# The three environments are made side by side (the Triton server's beside the project's, then the C++ build).
test:
	$(MAKE) --no-print-directory -j2 setup triton-env cpp
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) -m fast tests

# Figures for the README: docs/bench.json, docs/bench.md, docs/bench.png (a few minutes on 2 cores).
bench: setup triton-env cpp
	$(PY) -m l2c_export.tools.bench_suite --work engines/bench --docs docs

# The real sizes (not part of `make test`): random-weight diffusers folders in the configs of facebook/DiT-XL-2-256,
# PixArt-α 512, SD3-medium at 256 px (2B parameters), FLUX.1's width with 2 double + 4 single blocks (1.3B; the full
# FLUX.1 projected per block), Sana 1.6B at 1024 px, Qwen-Image's width with 4 of its 60 blocks at 256 px (1.4B;
# the full 20B projected per block), and Wan2.1-1.3B's width with 2 of its 30 blocks at 17 frames of 256 px (the whole
# 1.3B, Wan2.1-14B and Wan2.2-A14B projected per block), each built (`l2c-export build` in a child process: time,
# peak memory), verified, benchmarked against the ideal and against diffusers' own pipeline: docs/bench-large.json,
# docs/bench-large.md.
# Hours on 2 cores (Sana's alone about an hour at the default 6 steps); the builds hold the weights once (SD3-medium's
# 8 GB build peaks near 10 GiB of RAM), and saving the random folder, verify and the pipeline comparison hold them
# twice (Sana 1.6B: about 12 GiB). Every model of bench_suite.py's REAL_SIZES by default; rows can be picked, and
# the other rows of docs/bench-large.json are kept:
# make bench-large BENCH_LARGE_MODELS=Sana-1600M-1024,Qwen-Image-width-4-256
BENCH_LARGE_MODELS ?=
bench-large: setup cpp
	$(PY) -m l2c_export.tools.bench_suite --large --work engines/bench-large --docs docs \
		$(if $(BENCH_LARGE_MODELS),--models $(BENCH_LARGE_MODELS))

# The embedded default (model l2c: labels in) and the text-to-image default (model t2i-digits: a prompt in, an image
# out) on Triton Inference Server, on 127.0.0.1:8000 (HTTP), 8001 (gRPC), 8002 (metrics).
serve: setup triton-env
	$(CLI) build --out $(DEMO)/engines
	$(CLI) triton $(DEMO)/engines --repo $(DEMO)/triton
	$(CLI) build --model t2i-digits --out $(DEMO)/t2i-engines
	$(CLI) triton $(DEMO)/t2i-engines --repo $(DEMO)/triton --name t2i-digits
	$(CLI) serve $(DEMO)/triton --env $(TRITON_VENV)

clean:
	rm -rf $(VENV) $(TRITON_VENV) engines/demo engines/bench engines/bench-large .pytest_cache cpp/build

# --- C++ runtime (cpp/): `make cpp` builds cpp/build/l2c-run, libl2c_runtime and the embedding example. ------------
# ONNX Runtime's headers: Debian 13's libonnxruntime-dev, downloaded under a private APT_CONFIG, sha256-pinned and
# unpacked (nothing installed); its library: the onnxruntime wheel's in $(VENV), dlopen'ed at run time. The tokenizer
# library (prompts in C++): onnxruntime-genai-core's wheel from PyPI, sha256-pinned, its libonnxruntime-genai.so
# unzipped into cpp/build/deps/lib (nothing installed), dlopen'ed at run time. The other build dependencies are
# Debian packages, installed only where missing (root needed then).
CPP_BUILD := cpp/build
CPP_ORT_HEADERS := $(CPP_BUILD)/deps/include/onnxruntime
CPP_TOKENIZER_LIBRARY := $(CPP_BUILD)/deps/lib/libonnxruntime-genai.so
# strace is the tests' (test_triton traces the server's file writes), installed with the C++ build's packages.
CPP_DEBIAN_PACKAGES := cmake g++ make nlohmann-json3-dev libssl-dev libcli11-dev zlib1g-dev libpng-dev strace

# $(call cpp_configure,BUILD_FOLDER,EXTRA_CMAKE_ARGUMENTS)
cpp_configure = library=$$(ls $(abspath $(VENV))/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.* | head -n1); \
	  test -n "$$library" || { echo "make cpp: no libonnxruntime.so.1.* in the onnxruntime wheel of $(VENV)" >&2; exit 1; }; \
	  mkdir -p $(1) && cmake -S cpp -B $(1) -DL2C_ONNXRUNTIME_INCLUDE_DIR=$(abspath $(CPP_ORT_HEADERS)) \
	    -DL2C_ONNXRUNTIME_LIBRARY=$$library -DL2C_TOKENIZER_LIBRARY=$(abspath $(CPP_TOKENIZER_LIBRARY)) $(2) \
	    > $(1)/cmake.log || { cat $(1)/cmake.log; exit 1; }

cpp: setup cpp-deps $(CPP_ORT_HEADERS)/onnxruntime_cxx_api.h $(CPP_TOKENIZER_LIBRARY)
	@$(call cpp_configure,$(CPP_BUILD),-DCMAKE_BUILD_TYPE=Release)
	cmake --build $(CPP_BUILD) -j2 -- --no-print-directory

# The same runtime, programs and tests built with AddressSanitizer and UndefinedBehaviorSanitizer, in a folder of its
# own; `make cpp-asan-test` (or L2C_CPP_SANITIZE=1 with pytest) runs tests/test_cpp.py against it.
CPP_ASAN_BUILD := $(CPP_BUILD)/asan
cpp-asan: setup cpp-deps $(CPP_ORT_HEADERS)/onnxruntime_cxx_api.h $(CPP_TOKENIZER_LIBRARY)
	@$(call cpp_configure,$(CPP_ASAN_BUILD),-DCMAKE_BUILD_TYPE=RelWithDebInfo -DL2C_SANITIZE=ON)
	cmake --build $(CPP_ASAN_BUILD) -j2 -- --no-print-directory

cpp-asan-test: cpp-asan
	L2C_CPP_SANITIZE=1 $(PY) -m pytest -q tests/test_cpp.py

cpp-deps:
	@missing=$$(for p in $(CPP_DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "make cpp: installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi

$(CPP_ORT_HEADERS)/onnxruntime_cxx_api.h: cpp/scripts/fetch-onnxruntime-headers.sh
	cpp/scripts/fetch-onnxruntime-headers.sh $(CPP_BUILD)/deps
	touch $@

$(CPP_TOKENIZER_LIBRARY): cpp/scripts/fetch-tokenizer-library.sh | setup
	cpp/scripts/fetch-tokenizer-library.sh $(CPP_BUILD)/deps $(PY)
	touch $@
