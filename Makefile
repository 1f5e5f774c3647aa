# `make test` sets everything up from nothing (two virtual environments) and runs the whole suite: lint, every test
# tier (the real-host tiers skip unless their environment variables are set) and the WebUI-pinned compat run.
# `make quick` is the everyday loop: lint and the unit and integration tiers without the tests marked slow.
# `make demo` runs the short end-to-end demo.
PYTHON ?= python3
VENV := .venv
COMPAT := .venv-compat
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test lint pytest quick compat demo clean

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
	$(PY) -m ruff format --check .

pytest: setup
	$(PY) -m pytest -q

quick: lint
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration

# The same host and training tests on the WebUI's pinned transformers/diffusers/safetensors/numpy/Pillow.
compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -m pytest -q -m compat -p no:cacheprovider

test: lint pytest compat

demo: setup
	$(PY) -m embedding_trainer demo

clean:
	rm -rf $(VENV) $(COMPAT) demo-output
