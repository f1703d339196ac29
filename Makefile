# Every install goes through constraints.txt (torch==2.13.0: the CPU wheel on these machines).
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: demo test lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/sparseslice demo -o $(DEMO_OUT)

test: install-dev
	$(BIN)/python -m pytest -n 2 -q

lint: install-dev
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
