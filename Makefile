# Quickstart: `make demo` (main job on the embedded offline corpus), `make test` (test suite).
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install install-test docs clean llama-cpp

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3' with Python >= 3.10"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[plot,sentencepiece]"
	$(PY) -m neoformer.kernels  # build the CPU decode kernels now (~20 s once), not on first use
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/neoformer train --preset neoformer-x-demo --out runs/demo --overwrite

test: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" tests

docs: $(VENV)/.installed  # docs/config.md from the config dataclasses (a test checks it is current)
	$(PY) docs/gen_config_md.py

llama-cpp: $(VENV)/.installed  # llama.cpp's llama-bench + llama-completion for side-by-side benchmarks (~5 min)
	bash benchmarks/build_llama_cpp.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
