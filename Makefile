# make run   — set everything up and start the demo (proxy + demo VNC server + dev certificate)
# make test  — set everything up and run the whole suite (ruff, mypy, pytest)
# make bench — benchmarks (bench/README.md)
# make fuzz  — the fuzzers of tests/test_fuzz.py with thousands of examples each (a few minutes)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench lint typecheck unit setup system clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

system:
	bash scripts/setup-system.sh
	bash scripts/setup-page.sh

setup: $(STAMP) system

run: setup
	$(VENV)/bin/consoleproxy demo

lint: $(STAMP)
	$(VENV)/bin/ruff check consoleproxy tests bench buildsupport scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q

test: setup lint typecheck unit

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_proxyproto.py

bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
