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
# TorchRec (the embedding_backend=torchrec tables): fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0 is the
# pairing that loads with torch 2.13 (CPU); without their dependencies (they pin another torch and
# torchmetrics), then the two it needs, tensordict and pyre-extensions, under the constraints.
$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,pretrained]'
	$(BIN)/python -m pip install -q --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
	$(BIN)/python -m pip install -q -c constraints.txt tensordict pyre-extensions
	$(BIN)/python -c "import ctr, torch, torchrec; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m ctr.main

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The peers' environment: DeepCTR-Torch 0.3.0 over the same pinned torch (its undeclared imports
# requests and packaging, and pandas for the preprocessing its users write, installed beside it).
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): constraints.txt
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(PEERS)/bin/python -m pip install -q -c constraints.txt deepctr-torch==0.3.0 requests packaging pandas
	$(PEERS)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# side by side with DeepCTR-Torch (3 seeds), then the time split / overhead / FLOPs table
bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python experiments/bench_peers.py
	$(BIN)/python experiments/bench_overhead.py

clean:
	rm -rf $(VENV) outputs multirun .cache
