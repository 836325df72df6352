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

# perf_analyzer (in tritonclient's wheel) needs libb64 and libcudart.so.12 even without a GPU
CUDART := nvidia-cuda-runtime-cu12==12.9.79
PERF_STAMP := $(VENV)/.perf-tools

# the container-equivalent env (tests/gpu_stack): Python 3.12 + the NGC release's packages
GPU_STACK_VENV := .venv-gpu-stack

.PHONY: install gpu-stack-venv test test-slow test-deploy lint demo synth clean perf-tools bench-serve soak faults tiny-engines

install: $(STAMP) gpu-stack-venv

# re-run every time: stack_env.py itself is a no-op while its stamps match (package edits reinstall it)
gpu-stack-venv: $(STAMP)
	$(PY) tests/gpu_stack/stack_env.py --out $(GPU_STACK_VENV)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,serve]'
	$(PY) -m pip install -q --no-deps '$(PYTRITON)'
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-stub-site '$(STUB_NUMPY)'
	bash tests/meta_sam3_requirements.sh  # Meta's sam3, test-only, without its conflicting pins
	touch $@

test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# the Helm chart, KServe example and adapter rule, rendered and validated offline (seconds)
test-deploy: install
	$(PY) -m pytest -q tests/deploy

# ruff; the import contract (pyproject [tool.importlinter]); mypy resolves every import and checks
lint: install
	$(VENV)/bin/ruff check runtime export tests benchmarks triton_repo
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

synth: install
	$(VENV)/bin/conceptseg synth --out $(WEIGHTS) --size tiny

# start the Triton server (cpu profile), send the bundled sample, print the result, stop
demo: install
	$(VENV)/bin/conceptseg demo --weights $(WEIGHTS) --engines $(ENGINES)

perf-tools: install $(PERF_STAMP)

$(PERF_STAMP):
	test -e /usr/lib/x86_64-linux-gnu/libb64.so.0d || apt-get install -y -q libb64-0d \
		|| sudo apt-get install -y -q libb64-0d
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/perf-libs '$(CUDART)'
	touch $@

# the server under perf_analyzer (benchmarks/README.md); tiny engines are made when missing
bench-serve: perf-tools
	@if [ ! -f $(ENGINES)/manifest.json ]; then \
		[ "$(ENGINES)" = engines/tiny ] || { echo "$(ENGINES): no manifest.json; run conceptseg export"; exit 2; }; \
		[ -d $(WEIGHTS)/mllm ] || $(VENV)/bin/conceptseg synth --out $(WEIGHTS) --size tiny; \
		$(VENV)/bin/conceptseg export --weights $(WEIGHTS) --out $(ENGINES); \
	fi
	$(VENV)/bin/conceptseg bench serve --engines $(ENGINES)

tiny-engines: install
	@if [ ! -f $(ENGINES)/manifest.json ]; then \
		[ "$(ENGINES)" = engines/tiny ] || { echo "$(ENGINES): no manifest.json; run conceptseg export"; exit 2; }; \
		[ -d $(WEIGHTS)/mllm ] || $(VENV)/bin/conceptseg synth --out $(WEIGHTS) --size tiny; \
		$(VENV)/bin/conceptseg export --weights $(WEIGHTS) --out $(ENGINES); \
	fi

# 10 minutes at concurrency 4, fast and reasoning requests; RSS of every server process
# (benchmarks/soak.py; `make test` runs a short one)
SOAK_S ?= 600
soak: tiny-engines
	$(PY) benchmarks/soak.py soak --engines $(ENGINES) --duration $(SOAK_S) --concurrency 4

# the same load with stub kills (each model in turn), dropped and abandoned requests
FAULTS_S ?= 300
faults: tiny-engines
	$(PY) benchmarks/soak.py faults --engines $(ENGINES) --duration $(FAULTS_S) --concurrency 4

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) weights out engines/tiny
