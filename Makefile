# nucleiseg: `make setup` installs, `make test` proves it, `make demo` runs the main job end to end.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup test lint format demo ui bench clean

setup:  ## install the locked stack into $(VENV) (quick when nothing changed)
	@scripts/setup.sh $(VENV)

test: lint  ## ruff + the whole test suite
	PATH="$(CURDIR)/$(BIN):$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q --timeout 600 --durations 15

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo:  ## the whole pipeline on the embedded synthetic data
# data/ as data.dvc versions it (this repository's version: objects committed in .dvc-remote/), so that
# dvc status ends clean; a data.dvc whose data sits in an unreachable remote does not stop the demo.
	$(BIN)/dvc pull -q data.dvc || echo "make demo: could not pull data.dvc (above); continuing with data.dir of params.yaml"
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show

ui:  ## the MLflow UI on the local tracking store
	@echo "MLflow UI, model-training view: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

bench:  ## the benchmarks (minutes; figures go to benchmarks/README.md)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

.PHONY: prefect-server
prefect-server:  ## a local Prefect server, started once (UI and API on http://127.0.0.1:4200; runs until stopped)
	@echo "In the shells that run flows: export PREFECT_API_URL=http://127.0.0.1:4200/api"
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

.PHONY: serve-retrain
serve-retrain:  ## a local Prefect server, the retraining deployment and the inbox watcher (data.inbox); Ctrl-C stops all
	$(BIN)/nucleiseg serve-retrain
