# make run   — set everything up and start the demo (proxy + demo VNC server + dev certificate)
# make test  — set everything up and run the whole suite (ruff, mypy, pytest)
# make unit  — the tests that start no program (pytest -m "not integration"; tests/conftest.py)
# make bench — benchmarks (bench/README.md)
# make fuzz  — the fuzzers of tests/policy/test_fuzz.py with thousands of examples each (a few minutes)
# make test-lowest — the console-path tests on the lowest version of every dependency pyproject.toml
#                    allows (scripts/lowest-constraints.py), in a virtualenv of their own (.venv-lowest)
# make test-pythons — the console-path tests on Python 3.12 and 3.13 when this machine has them

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

LOWEST := .venv-lowest
# The console path (plain, TLS, VeNCrypt; both event loops where conftest.py says so) and the
# modules each dependency serves: tokens (joserfc, cryptography), replay stores (redis), health
# (psutil), DNS (dnspython), metrics (prometheus-client), reload, ACME orders against Pebble (acme).
LOWEST_TESTS := tests/test_console_path.py tests/tls/test_tls_proxy.py tests/net/test_vencrypt.py \
	tests/net/test_relay_close.py tests/net/test_listener.py tests/test_drain.py tests/protocol/test_rfb.py \
	tests/protocol/test_rfb_messages.py \
	tests/protocol/test_wsframes.py tests/protocol/test_wsconnection.py tests/policy/test_tokens.py tests/policy/test_cloudstack.py tests/policy/test_replay_stores.py \
	tests/web/test_health.py tests/net/test_dns.py tests/test_reload.py tests/tls/test_acme.py tests/policy/test_acme_policy.py

PYTHONS_TESTS := tests/test_console_path.py tests/tls/test_tls_proxy.py tests/net/test_vencrypt.py \
	tests/net/test_relay_close.py tests/test_reload.py

.PHONY: run test bench lint typecheck unit suite setup system clean fuzz test-lowest test-pythons

$(STAMP): pyproject.toml consoleproxy/__init__.py  # the version: the installed metadata follows it
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

# Pure code only: tests/conftest.py refuses to start a program in a test not marked integration.
unit: setup
	$(VENV)/bin/pytest -q -m "not integration"

suite: setup
	$(VENV)/bin/pytest -q

test: setup lint typecheck suite

$(LOWEST)/.installed: pyproject.toml scripts/lowest-constraints.py
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python scripts/lowest-constraints.py > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install -q -c $(LOWEST)/constraints.txt -e '.[test]'
	touch $@

test-lowest: system $(LOWEST)/.installed
	$(LOWEST)/bin/python scripts/lowest-constraints.py --check
	$(LOWEST)/bin/pytest -q -p no:cacheprovider $(LOWEST_TESTS)

test-pythons: system
	bash scripts/test-other-pythons.sh $(PYTHONS_TESTS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q -p no:cacheprovider tests/policy/test_fuzz.py tests/protocol/test_proxyproto.py

bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) $(LOWEST) .venv-py3.* .pytest_cache .mypy_cache .ruff_cache
