# The two commands a new user needs: `make demo` and `make test`. Both create the virtual
# environment on first use (torch and torchvision come from the local wheels). `demo` installs
# only what visionflow needs; `test` adds the test-only extras (`.[dev]`: pytest, ruff, grad-cam...)
# to the same environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp
PYTEST_ARGS ?=

# Commands that exec tools by name (mlflow models serve -> uvicorn) find the environment's.
export PATH := $(abspath $(BIN)):$(PATH)
# Telemetry off: nothing may wait on the network.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv demo test unit ui clean-demo

# pip install -e, keeping pip's notice about a local wheel's extras out of the output.
define install
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '$(1)' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import cvlib, tasks, flows, torch, torchvision, prefect, mlflow"
endef

# What visionflow needs to run (demo, ui). Up to date after the dev install too: that one
# touches this stamp, so `make test` then `make demo` installs nothing more.
$(STAMP): pyproject.toml
	$(call install,.)
	@touch $(STAMP)

# ... plus the test-only extras (test, unit).
$(DEV_STAMP): pyproject.toml
	$(call install,.[dev])
	@$(BIN)/python -c "import pytest, pytest_timeout, hypothesis, pytorch_grad_cam" && test -x $(BIN)/ruff
	@touch $(DEV_STAMP) $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/visionflow demo

test: $(DEV_STAMP)
	$(BIN)/ruff check cvlib tasks flows tests benchmarks deployments
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The MLflow UI on the embedded store (runs, metrics, artifacts, registered models).
ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri "sqlite:///$${VISIONFLOW_HOME:-$$HOME/.visionflow}/mlflow.db"

clean-demo:
	rm -rf "$${VISIONFLOW_HOME:-$$HOME/.visionflow}/demo"
