# webhook-router: every install step lives here, so a fresh machine needs only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The development key `make run` serves with. It is printed on start: never use it in production.
DEV_KEY ?= DEV-ONLY-not-a-secret

.PHONY: run test lint check-config clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

## run: install into .venv and serve config.example.yaml (file sinks under ./var) with a dev key
run: $(VENV)/.installed
	@echo "================================================================================"
	@echo " DEVELOPMENT KEY: $(DEV_KEY)"
	@echo " (for trying webhook-router locally only; set METRIPORT_WEBHOOK_KEY for real use)"
	@echo " Send a signed test message from another terminal:"
	@echo "   $(BIN)/webhook-router send --url http://127.0.0.1:8080/webhook --key $(DEV_KEY) --type patient.admit"
	@echo "================================================================================"
	METRIPORT_WEBHOOK_KEY=$(DEV_KEY) $(BIN)/webhook-router serve --config config.example.yaml

## test: install into .venv with test extras, lint and type-check, run the whole test suite
test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check router plugins tests
	$(BIN)/ruff format --check router plugins tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
