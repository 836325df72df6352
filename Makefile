# Everything installs into .venv/ at the repository root; re-running is a no-op when up to date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS ?= weights/tiny
ENGINES ?= engines/tiny
# tritonserver 2.51.0 with the Python backend, from its wheel (--no-deps: it pins numpy<2)
PYTRITON := nvidia-pytriton==0.5.13
# the backend stub's pybind11 predates numpy 2: it gets numpy 1.26 layered over .venv (serve.py)
STUB_NUMPY := numpy==1.26.4

.PHONY: install test test-slow lint demo synth clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,serve]'
	$(PY) -m pip install -q --no-deps '$(PYTRITON)'
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-stub-site '$(STUB_NUMPY)'
	bash tests/meta_sam3_requirements.sh  # Meta's sam3, test-only, without its conflicting pins
	touch $@

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check runtime export tests benchmarks triton_repo

synth: install
	$(VENV)/bin/conceptseg synth --out $(WEIGHTS) --size tiny

# start the Triton server (cpu profile), send the bundled sample, print the result, stop
demo: install
	$(VENV)/bin/conceptseg demo --weights $(WEIGHTS) --engines $(ENGINES)

clean:
	rm -rf $(VENV) weights out engines/tiny
