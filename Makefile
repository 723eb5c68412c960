# The two commands a new user needs: `make demo` and `make test`. Both create the virtual
# environment on first use (torch and torchvision come from the local wheels).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# Commands that exec tools by name (mlflow models serve -> uvicorn) find the environment's.
export PATH := $(abspath $(BIN)):$(PATH)
# Telemetry off: nothing may wait on the network.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv demo test unit ui clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import cvlib, tasks, flows, torch, torchvision, prefect, mlflow" 
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/visionflow demo

test: $(STAMP)
	$(BIN)/ruff check cvlib tasks flows tests benchmarks deployments
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The MLflow UI on the embedded store (runs, metrics, artifacts, registered models).
ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri "sqlite:///$${VISIONFLOW_HOME:-$$HOME/.visionflow}/mlflow.db"

clean-demo:
	rm -rf "$${VISIONFLOW_HOME:-$$HOME/.visionflow}/demo"
