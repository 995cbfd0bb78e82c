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

.PHONY: setup demo test bench clean fuzz

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

# the long fuzz run (tests/fuzz_harness.py): FUZZ_CASES cases from FUZZ_SEED, FUZZ_WORKERS processes,
# FUZZ_TIME seconds at most (0: no limit); failing case descriptors land in build/fuzz/failures.json
FUZZ_CASES ?= 5000
fuzz: setup
	FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python tests/fuzz_harness.py --dir build/fuzz --failures build/fuzz/failures.json

clean:
	rm -rf build $(VENV)
