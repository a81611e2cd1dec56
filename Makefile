# Entry points for a fresh machine. Every target first makes sure the one shared virtual
# environment exists (tools/bootstrap.sh; a no-op in well under a second when nothing changed).
SHELL := /bin/bash
VENV ?= $(or $(SPECULATIVE_AV_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/speculative_av/venv)
export SPECULATIVE_AV_VENV := $(VENV)
# A Python from another ROS-wheels venv exports this guard; inheriting it breaks ours.
PY := env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE $(VENV)/bin/python

.PHONY: env test launch-check benchmark demo evaluation data-engine mutation lock triton-env triton-server fleet-table

env:
	@tools/bootstrap.sh

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

# The launch files under the real ROS 2 launch system (test/test_launch.py, which `make test` skips
# without one): LAUNCH_PYTHONPATH holds launch and launch_ros sources (README, "Launch files").
space := $() $()
LAUNCH_PATH = $(subst $(space),:,$(strip $(LAUNCH_PYTHONPATH) $(PYTHONPATH)))
launch-check: env
	PYTHONPATH=$(LAUNCH_PATH) $(PY) -c 'import launch_ros.actions, ros2launch.api' || \
	    { echo 'launch_ros is not importable: set LAUNCH_PYTHONPATH (README)' >&2; exit 1; }
	PYTHONPATH=$(LAUNCH_PATH) $(PY) -m pytest -rs test/test_launch.py $(PYTEST_ARGS)

# The README "Benchmarks" tables: test/test_benchmarks.py, ~16 min; writes $(BENCHMARK_JSON)
# (default out/benchmark.json). PYTEST_ARGS picks other benchmarks instead (e.g. the soak).
benchmark: env
	$(PY) -m pytest -m benchmark -s $(or $(PYTEST_ARGS),test/test_benchmarks.py)

demo: env
	$(PY) -m speculative_av.tools.demo $(DEMO_ARGS)

# The README's evaluation tables: a held-out drive (seed 11), both trained models, three
# networks, the fixed and the adaptive uplink side by side.
EVALUATE_ARGS ?= --profiles good-lte poor-lte lte-drive --uplink fixed adaptive
evaluation: env
	test -d out/eval_recording || \
	    $(PY) -m speculative_av.tools.make_recording out/eval_recording --frames 200 --seed 11
	$(PY) -m speculative_av.tools.evaluate out/eval_recording $(EVALUATE_ARGS)

# The fleet data engine's whole loop (README "The fleet data engine"): drive A mined for
# triggered snippets, uploaded, curated, a fine-tuned candidate gated per condition, swapped
# over the air into a running node, improvement measured on drive B. Writes out/data_engine/.
data-engine: env
	$(PY) -m speculative_av.tools.data_engine $(DATA_ENGINE_ARGS)

# Mutation testing of speculative_av/core/ against its fast unit tests (setup.cfg [mutmut];
# README, "Mutation testing"): ~5 min on one core. Starts from a clean mutants/ each time, so
# no verdict is stale; afterwards `mutmut results` lists survivors, `mutmut show NAME` the diff.
MUTATION_JOBS ?= 1
# COLCON_IGNORE: the copy holds a package.xml, which colcon would take for a second package.
mutation: env
	rm -rf mutants && mkdir mutants && touch mutants/COLCON_IGNORE
	set -o pipefail; env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE $(VENV)/bin/mutmut run \
	    --max-children $(MUTATION_JOBS) | tr '\r' '\n' | tail -n 3
	$(PY) tools/mutation_summary.py mutants

lock:
	tools/lock.sh

# The Triton environment (nvidia-pytriton, numpy<2; README, "Triton and the Open Inference
# Protocol"), borrowing the main venv's torch. No-op when nothing changed.
TRITON_VENV ?= $(or $(SPECULATIVE_AV_TRITON_VENV),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/speculative_av/triton-venv)
export SPECULATIVE_AV_TRITON_VENV := $(TRITON_VENV)
triton-env: env
	@tools/bootstrap_triton.sh

triton-server: triton-env
	env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE $(TRITON_VENV)/bin/python -m speculative_av.cloud.triton_server $(TRITON_ARGS)

# README "Serving a fleet" table: fleet_load against FIFO (before), deadline-aware, + batching,
# Triton (~15 min on a quiet machine; FLEET_SIZES, FLEET_DURATION, FLEET_OUT override).
fleet-table: triton-env
	FLEET_PYTHON=$(VENV)/bin/python tools/fleet_table.sh
