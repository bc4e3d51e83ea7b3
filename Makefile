# `make run` and `make test` each set up .venv when it is missing (quick when it exists).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CTR_DATA_DIR ?= $(abspath ../shared/data)
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: run test test-fast bench venv clean

venv: $(STAMP)

# torch goes in first, pinned, so that no dependency can pull a CUDA build of it;
# everything else is installed under constraints.txt (the versions tested here).
$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,pretrained]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m ctr.main

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python experiments/bench_ctr.py

clean:
	rm -rf $(VENV) outputs multirun .cache
