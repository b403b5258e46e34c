# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first and
# are quick when everything is already installed (the stamp file tracks setup.cfg).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) -m tools.demo $(ARGS)

clean:
	rm -rf $(VENV) runs
