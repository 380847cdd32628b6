# edgeprune: everything runs from a local virtualenv that `make` creates.
# Overridable: PYTHON, VENV, TORCH_SPEC, LLAMA_CPP_SPEC, LLAMA_CMAKE_ARGS (e.g. for ARM: LLAMA_CMAKE_ARGS=).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
# A portable x86 build: the default native build crashes on Intel AMX CPUs with quantized models (llama.cpp #20824).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
DEMO_PROFILE ?= raspberry-pi-5-8gb
# MODEL=gemma3 runs the same export on Gemma 3 270M (the second real model, under the Gemma terms)
MODEL ?= smollm2
DEMO_OUT ?= out/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeprune-installed
TEST_STAMP := $(VENV)/.edgeprune-test-installed
# llama-cpp-python forces llama.cpp's common library on; this file, read as llama.cpp's project starts, turns it off
LLAMA_NO_COMMON = $(abspath $(VENV))/llama-no-common.cmake
# an extra's requirements, read from pyproject.toml, so they can install beside the llama-cpp-python compile
export EXTRA_REQUIREMENTS := import sys, tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	@# llama-cpp-python has no wheel on the registry: its compile, most of a first install, runs on every core while
	@# torch and the build extra's other packages download and unpack beside it. It compiles only what its Python
	@# package loads: LLAVA_BUILD=OFF leaves out the multimodal library (loaded only by llama-cpp-python's image chat
	@# handlers, which edgeprune never uses), and LLAMA_NO_COMMON llama.cpp's common library (never loaded).
	rm -rf $(VENV)/wheels
	printf 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)\n' > $(LLAMA_NO_COMMON)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE=$(LLAMA_NO_COMMON)" \
	    $(PY) -m pip wheel -q --no-deps -w $(VENV)/wheels \
	    "$(LLAMA_CPP_SPEC)" & \
	$(PY) -m pip install -q "$(TORCH_SPEC)" $$($(PYTHON) -c "$$EXTRA_REQUIREMENTS" build) && wait $$!
	$(PY) -m pip install -q --find-links $(VENV)/wheels "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install -q -e ".[build]"
	touch $(STAMP)

# the test extra on top of the build install: pytest, import-linter and the server's packages
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[build,test]"
	touch $(TEST_STAMP)

demo: install
	$(VENV)/bin/edgeprune export "$$($(PY) -m edgeprune.core.fetch $(MODEL))" --profile $(DEMO_PROFILE) --out $(DEMO_OUT)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

# The inner loop: unit tests and in-process tiny-model tests; no SmolLM2, sshd, chromium, fresh virtualenv,
# llama.cpp converter or child process (tests/conftest.py marks those `slow` by what they use).
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m edgeprune.build.bench
	$(PY) -m edgeprune.build.bench.pruning

clean:
	rm -rf $(VENV) out bench-results
