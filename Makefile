# grokconv: the two README commands are `make demo` (set up, run the main job on a synthetic model)
# and `make test` (set up, run the test suite). `make bench` measures throughput and memory.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := build/demo
BENCH_DIR ?= build/bench
BENCH_ARGS ?=            # e.g. BENCH_ARGS='--device cuda --layers 4'
# this workplace keeps the CPU build of torch in /opt/wheels; elsewhere pip finds it on the index
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup demo test bench clean llama-cpp-src test-llama-cpp

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FIND) -c .ci/constraints.txt -e '.[test]'
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(BIN)/grokconv synth $(DEMO)/tiny --preset tiny
	$(BIN)/grokconv inspect $(DEMO)/tiny
	$(BIN)/grokconv to-safetensors $(DEMO)/tiny $(DEMO)/tiny-fp8 --quantize fp8 --no-progress
	$(BIN)/grokconv parity $(DEMO)/tiny $(DEMO)/tiny-fp8 --layers all --batch 2 --seq-len 16 --no-progress

test: setup llama-cpp-src
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench.py --dir $(BENCH_DIR) $(BENCH_ARGS)

clean:
	rm -rf build $(VENV)

# llama.cpp, for the GGUF tests: its convert_hf_to_gguf.py (+ conversion/, gguf-py/) from the llama-cpp-python
# sdist on PyPI, cached in build/ (no compile; tests skip with a reason when this could not be fetched), and
# libllama itself (llama-cpp-python compiles it: ~12 min on 2 cores, pip caches the built wheel).
LLAMA_CPP_PY ?= 0.3.36
LLAMA_SRC := build/llama-cpp
LLAMA_CMAKE ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

llama-cpp-src: $(LLAMA_SRC)/llama.cpp/convert_hf_to_gguf.py

$(LLAMA_SRC)/llama.cpp/convert_hf_to_gguf.py: | setup
	mkdir -p $(LLAMA_SRC)
	-$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d $(LLAMA_SRC) && \
	 tar -xzf $(LLAMA_SRC)/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(LLAMA_SRC) --strip-components=2 \
	  llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/gguf-py && \
	 rm -f $(LLAMA_SRC)/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz

test-llama-cpp: setup
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install $(PIP_FIND) -c .ci/constraints.txt -e '.[llama-cpp]'
	$(BIN)/python -m pytest tests/test_llama_cpp.py -v -rs
