# The few commands people type. `make demo` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint llama-cpp clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel on these machines; GPU users: install CUDA torch first, then `pip install -e .[cuda]`.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlora-med run recipes/demo_cpu.yaml

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check qlora_med kernels tests benchmarks

# The pinned llama.cpp the GGUF tests run (tests/integration/test_llama_cpp.py; they skip without it): CPU tools
# built from the llama-cpp-python sdist into .cache/llama.cpp-<version>/bin; a no-op once built. Needs cmake, g++.
llama-cpp: $(STAMP)
	$(BIN)/python tests/helpers/llama_cpp_build.py

clean:
	rm -rf runs .cache
