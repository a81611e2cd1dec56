# Entry points for a fresh machine. Every target first makes sure the one shared virtual
# environment exists (tools/bootstrap.sh; a no-op in well under a second when nothing changed).
SHELL := /bin/bash
VENV ?= $(or $(SPECULATIVE_AV_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/speculative_av/venv)
export SPECULATIVE_AV_VENV := $(VENV)
# A Python from another ROS-wheels venv exports this guard; inheriting it breaks ours.
PY := env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE $(VENV)/bin/python

.PHONY: env test benchmark demo lock protos

env:
	@tools/bootstrap.sh

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

benchmark: env
	$(PY) -m pytest -m benchmark -s $(PYTEST_ARGS)

demo: env
	@echo "demo: not yet: the speculative detector node lands with issue 3." >&2; exit 2

lock:
	tools/lock.sh
