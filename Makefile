# Two commands matter to a newcomer: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/vllm-operator
DEVPY := PYTHONPATH=hack $(PY)

.PHONY: help venv engine binaries model cluster-up cluster-down crds test demo demo-down screenshot bench chaos

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## the operator's virtual environment (.venv)

engine: venv ## the vLLM CPU engine's virtual environment (cached under ~/.cache/vllm-operator)
	$(DEVPY) -m devcluster.engine ensure

binaries: venv ## build etcd, kube-*, kwok, helm, prometheus, promtool and the LeaderWorkerSet controller once (cached under ~/.cache/vllm-operator/bin)
	$(DEVPY) -m devcluster.binaries

model: engine ## generate the tiny test model into the cache
	$(DEVPY) -m devcluster.engine model

cluster-up: binaries ## start the local control plane; prints `export KUBECONFIG=...` last
	@$(DEVPY) -m devcluster up

cluster-down: venv ## stop every process of the local control plane
	@$(DEVPY) -m devcluster down

crds: venv ## regenerate crds/ and the chart's copy from the pydantic models
	$(PY) -m vllm_operator.cli crds --write

test: binaries model ## run the test suite (starts its own local cluster when none is running)
	$(PY) -m pytest

demo: binaries model ## the whole user path on the local cluster with real vLLM
	@$(DEVPY) -m devcluster.demo up

demo-down: venv ## stop everything the demo started and remove its state
	@$(DEVPY) -m devcluster.demo down

screenshot: venv ## redraw docs/images/dashboard.png: the chart's dashboard under load, from the running demo's Prometheus
	@$(DEVPY) -m devcluster.screenshot

bench: binaries ## benchmarks; BENCH_SIZE=small for a quick run
	$(DEVPY) -m bench

CHAOS_SIZE ?= full
chaos: binaries ## fault suite on a cluster of its own (operator kills, apiserver/etcd restarts, failover); CHAOS_SIZE=ci for a quick run
	$(DEVPY) -m devcluster.chaos --size $(CHAOS_SIZE) $(CHAOS_ARGS)
