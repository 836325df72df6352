# Everything installs into .venv/ at the repository root; re-running is a no-op when up to date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS ?= weights/tiny

.PHONY: install test test-slow lint demo synth clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check runtime export tests benchmarks

synth: install
	$(VENV)/bin/conceptseg synth --out $(WEIGHTS) --size tiny

demo: install
	$(VENV)/bin/conceptseg demo --weights $(WEIGHTS)

clean:
	rm -rf $(VENV) weights out
