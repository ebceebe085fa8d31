# taskcodec — common tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
TOOLS     := .cache/tools
PYTEST_ARGS ?=
UI_PORT   ?= 5000

# Targets of the training image (docker/) and of the team tracking server (deploy/).
-include docker/image.mk
-include deploy/tracking.mk
-include benchmarks/bench.mk

.PHONY: help init install update build test demo mlflow-ui lint clean system-deps scalable-demo paper-check

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml poetry.lock scripts/install scripts/install-from-lock.py
	scripts/install
	@touch $@

install: $(STAMP) ## install the locked environment into .venv/ (console scripts in .venv/bin/)

init: install ## first-time set-up: install, git hooks, direnv hint
	git config core.hooksPath .githooks
	@echo "Set up. With direnv, run 'direnv allow' once to activate .venv and the defaults in .envrc."

$(TOOLS)/bin/poetry:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "poetry>=2.1,<3"

update: $(TOOLS)/bin/poetry ## refresh poetry.lock from pyproject.toml
	$(TOOLS)/bin/python scripts/update-lock.py
	$(MAKE) install

build: install ## build the wheel and the sdist into dist/
	$(PY) -m build --outdir dist .

system-deps: ## install the Debian packages the tests use (Slurm, sshd, Chromium; needs root)
	scripts/system-deps

test: install system-deps ## run the test suite (starts its own servers on 127.0.0.1)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install ## train a small codec on the embedded images, evaluate it, compare with JPEG, WebP, AVIF
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/demo

scalable-demo: install ## the scalable-coding pipeline on the embedded scenes (base, enhancements, RD)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/scalable-demo

paper-check: install ## the papers' claims H1-H4 at CPU scale: 5 seeds, one process, verdicts by the numbers
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/paper-check

mlflow-ui: install ## open the MLflow UI over the local store (./mlflow.db) on 127.0.0.1
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C to stop)"
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
		--host 127.0.0.1 --port $(UI_PORT)

lint: install ## static checks
	$(VENV)/bin/ruff check src tests

clean: ## remove build outputs and caches (keeps .venv, mlflow.db and checkpoints)
	rm -rf dist build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
