# hsmca developer tasks.  `make test` is what CI runs (via .ci/run).
#
#   make test PYTEST_ARGS='-k ocsp -x'    extra pytest arguments
#   make run HSMCA_HOME=/srv/hsmca        state/config directory (default: .hsmca)

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
# Interpreter used to create the venv: python3.11 if available, else python3.
BOOT_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
PYTEST_ARGS ?=

SOFTHSM_LIBS := /usr/lib/softhsm/libsofthsm2.so \
                /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
                /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so
SOFTHSM_LIB  := $(firstword $(wildcard $(SOFTHSM_LIBS)))
# Debian packages to install: softhsm2 if the library is missing, opensc for
# pkcs11-tool and openssl for the CLI when those commands are missing.
MISSING_PKGS := $(strip $(if $(SOFTHSM_LIB),,softhsm2) \
                $(if $(shell command -v pkcs11-tool 2>/dev/null),,opensc) \
                $(if $(shell command -v openssl 2>/dev/null),,openssl))

.PHONY: venv softhsm acme-clients dashboard-browser test run lint bench clean

## venv: create .venv and (re)install the project when pyproject.toml changes
venv: $(STAMP)

$(PY):
	@test -n "$(BOOT_PYTHON)" || { echo "error: python3 not found on PATH" >&2; exit 1; }
	$(BOOT_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: '$(BOOT_PYTHON) -m venv' failed: install python3-venv" >&2; exit 1; }

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[test]'
	touch $@

## softhsm: make sure SoftHSM2, pkcs11-tool (opensc) and the openssl CLI are installed
## (a no-op when they are: the checks below run when the Makefile is read)
softhsm:
ifneq ($(MISSING_PKGS),)
	@if [[ $$(id -u) -eq 0 ]]; then sudo=""; \
	elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	elif [[ -z "$(SOFTHSM_LIB)" ]]; then \
	  echo "SoftHSM2 is missing: run \`sudo apt-get install softhsm2 opensc\`" \
	       "or set hsm.module to your vendor's PKCS#11 module" >&2; \
	  exit 1; \
	else \
	  echo "warning: cannot install $(MISSING_PKGS) (not root, no passwordless sudo)" >&2; \
	  exit 0; \
	fi; \
	set -ex; \
	$$sudo apt-get update; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $(MISSING_PKGS)
	@for f in $(SOFTHSM_LIBS); do [[ -e $$f ]] && exit 0; done; \
	echo "error: libsofthsm2.so still not found after installing $(MISSING_PKGS)" >&2; exit 1
endif

# ACME test peers from Debian: lego (a client) and pebble (pebble-challtestsrv, a DNS and
# challenge test server; pebble itself is the reference CA of bench/acme.py). certbot
# comes from PyPI with the test extras.
ACME_PKGS := $(strip $(if $(shell command -v lego 2>/dev/null),,lego) \
             $(if $(shell command -v pebble-challtestsrv 2>/dev/null),,pebble))

## acme-clients: make sure lego and pebble-challtestsrv are installed (tests need them)
acme-clients:
ifneq ($(ACME_PKGS),)
	@if [[ $$(id -u) -eq 0 ]]; then sudo=""; \
	elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "error: the ACME tests need $(ACME_PKGS): run \`sudo apt-get install $(ACME_PKGS)\`" >&2; \
	  exit 1; fi; \
	set -ex; \
	$$sudo apt-get update; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $(ACME_PKGS)
endif

# Debian's chromium: tests/test_dashboard.py renders the operator dashboard in it (headless)
# and checks the numbers it shows against the API.

## dashboard-browser: make sure chromium is installed (the dashboard test needs it)
dashboard-browser:
ifeq ($(shell command -v chromium 2>/dev/null),)
	@if [[ $$(id -u) -eq 0 ]]; then sudo=""; \
	elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "error: the dashboard test needs chromium: run \`sudo apt-get install chromium\`" >&2; \
	  exit 1; fi; \
	set -ex; \
	$$sudo apt-get update; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
	@command -v chromium >/dev/null || { echo "error: chromium still missing" >&2; exit 1; }
endif

## test: full test suite (pytest with 2 xdist workers) followed by ruff
# the reliability tests (issue #8) append their figures here; printed after the suite
FIGURES     := $(CURDIR)/.reliability-figures.jsonl

test: venv softhsm acme-clients dashboard-browser
	rm -f $(FIGURES)
	status=0; HSMCA_FIGURES=$(FIGURES) $(PY) -m pytest -n 2 -q $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m tests.figures $(FIGURES); exit $$status
	$(VENV)/bin/ruff check .

## run: initialise $HSMCA_HOME on first use, then serve
run: venv softhsm
	set -e; \
	if [[ ! -f "$${HSMCA_HOME:-.hsmca}/hsmca.toml" ]]; then $(VENV)/bin/hsmca init; fi; \
	exec $(VENV)/bin/hsmca serve

lint: venv
	$(VENV)/bin/ruff check .

bench: venv softhsm acme-clients
	$(PY) bench/issue.py

## clean: remove the venv and caches (never the .hsmca home)
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . \( -path ./.git -o -path ./.hsmca \) -prune \
	  -o -type d -name __pycache__ -prune -exec rm -rf {} +
