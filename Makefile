# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first and
# are quick when everything is already installed (the stamp file tracks setup.cfg).
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

.PHONY: demo test test-web web setup clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	set -o pipefail; test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --upgrade pip $(QUIET)
	set -o pipefail; $(PY) -m pip install -q -e '.[test,pretrained]' $(QUIET)
	touch $(STAMP)

test: $(STAMP)
	set -o pipefail; $(PY) -m pytest -n 2 --dist loadfile tests $(QUIET)

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
	rm -rf $(VENV) runs web/node_modules
