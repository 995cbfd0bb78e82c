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

DEV_ARGS ?=              # e.g. DEV_ARGS='path/to/ckpt --layers 0-1' (default: the tiny synthetic model)

.PHONY: setup demo test bench clean deviations wheel-check fuzz

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

test: setup
	$(BIN)/python -m pytest

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

clean:
	rm -rf build $(VENV)
