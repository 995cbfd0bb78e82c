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

.PHONY: setup demo test bench clean

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

clean:
	rm -rf build $(VENV)
