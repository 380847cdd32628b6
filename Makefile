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

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install -q -e ".[build,test]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/edgeprune export "$$($(PY) -m edgeprune.core.fetch $(MODEL))" --profile $(DEMO_PROFILE) --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

# The inner loop: unit tests and in-process tiny-model tests; no SmolLM2, sshd, chromium, fresh virtualenv,
# llama.cpp converter or child process (tests/conftest.py marks those `slow` by what they use).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) -m edgeprune.build.bench
	$(PY) -m edgeprune.build.bench.pruning

clean:
	rm -rf $(VENV) out bench-results
