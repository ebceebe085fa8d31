# The team tracking server (scripts/tracking-server); included from the Makefile.
# Settings and secrets come from the environment (see `scripts/tracking-server --help` and the
# README section "Team tracking server"); these variables only choose where and how it listens.
TRACKING_DIR           ?= $(HOME)/.local/state/taskcodec/tracking-server
TRACKING_HOST          ?= 127.0.0.1
TRACKING_PORT          ?= 5000
TRACKING_WORKERS       ?= 2
# Host names users reach the server by (MLflow's DNS-rebinding guard), comma-separated.
TRACKING_ALLOWED_HOSTS ?=

.PHONY: tracking-server tracking-server-stop

tracking-server: install ## start the team MLflow server (PostgreSQL + S3 + accounts; settings from env)
	scripts/tracking-server start --dir "$(TRACKING_DIR)" --host "$(TRACKING_HOST)" \
		--port "$(TRACKING_PORT)" --workers "$(TRACKING_WORKERS)" \
		$(if $(TRACKING_ALLOWED_HOSTS),--allowed-hosts "$(TRACKING_ALLOWED_HOSTS)")

tracking-server-stop: ## stop the team MLflow server started by `make tracking-server`
	scripts/tracking-server stop --dir "$(TRACKING_DIR)"
