# `make test` sets everything up from nothing (two virtual environments) and runs the whole suite.
# `make demo` runs the short end-to-end demo.
PYTHON ?= python3
VENV := .venv
COMPAT := .venv-compat
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint unit compat demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned: any looser request makes pip fetch a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(COMPAT)/.installed: requirements-compat.txt
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q torch==2.13.0
	$(COMPAT)/bin/python -m pip install -q -r requirements-compat.txt
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check .

unit: setup
	$(PY) -m pytest -q

# The same host and training tests on the WebUI's pinned transformers/diffusers/safetensors/numpy/Pillow.
compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -m pytest -q -m compat -p no:cacheprovider

test: lint unit compat

demo: setup
	$(PY) -m embedding_trainer demo

clean:
	rm -rf $(VENV) $(COMPAT) demo-output
