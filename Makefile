# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first and
# are quick when everything is already installed (the stamp file tracks setup.cfg and the pins in
# constraints.txt, which every install here uses so that a fresh machine gets what CI tested).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

# Lines that say nothing about this project's run (tools/quiet_patterns.txt): pip's notes on this
# machine's package-index configuration, TensorFlow's and the TFLite converter's start-up and
# conversion notices. They are dropped; every other line (real errors and warnings included)
# passes, and the exit status stays the command's own.
QUIET = 2>&1 | { grep -v -E --line-buffered -f tools/quiet_patterns.txt || true; }

.PHONY: demo test test-web web setup constraints clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	set -o pipefail; test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q -c constraints.txt --upgrade pip $(QUIET)
	set -o pipefail; $(PY) -m pip install -q -c constraints.txt -e '.[test,pretrained]' $(QUIET)
	touch $(STAMP)

# The linter first (rules in pyproject.toml), then the tests.
test: $(STAMP)
	$(PY) -m ruff check .
	set -o pipefail; $(PY) -m pytest -n 2 --dist loadfile tests $(QUIET)

# New pins: a fresh venv installs the newest versions that setup.cfg allows, and its freeze
# (less the editable mess-tf and the build tools) replaces constraints.txt below its comment.
PINS_VENV := .venv-pins
constraints:
	rm -rf $(PINS_VENV) && $(PYTHON) -m venv $(PINS_VENV)
	set -o pipefail; $(PINS_VENV)/bin/pip install -q --upgrade pip $(QUIET)
	set -o pipefail; $(PINS_VENV)/bin/pip install -q -e '.[test,pretrained]' $(QUIET)
	{ grep '^#' constraints.txt; $(PINS_VENV)/bin/pip freeze --all --exclude-editable \
	  | grep -v -E '^(#|setuptools==|wheel==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(PINS_VENV)

# The page's tests alone, with their comparison tables (needs chromium, node and web/node_modules).
test-web: $(STAMP)
	set -o pipefail; $(PY) -m pytest -s tests/test_web.py $(QUIET)

# The demo's models in the page: runs `make demo` first if it has not finished, exports them for
# LiteRT.js once (runs/web), serves the page on 127.0.0.1 and prints its URL.
web: $(STAMP)
	test -f runs/demo/report/summary.md || $(MAKE) demo
	set -o pipefail; PYTHONUNBUFFERED=1 $(PY) -m tools.web --run_dir=runs/demo --out=runs/web $(ARGS) $(QUIET)

demo: $(STAMP)
	set -o pipefail; PYTHONUNBUFFERED=1 $(PY) -m tools.demo $(ARGS) $(QUIET)

clean:
	rm -rf $(VENV) $(PINS_VENV) runs web/node_modules
