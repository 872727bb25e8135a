# Developer entry points. Every target sets up .venv itself on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test lint proto bench bench-cluster compose-test chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start kmsd with embedded defaults on loopback (data under ./.kmsd-dev).
run: $(STAMP)
	$(BIN)/kmsd dev

## Run the whole test suite (unit, end-to-end, cross-language).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check kmsd clients/python/kms_client tests bench tools
	$(BIN)/mypy

## Regenerate clients/python/kms from protos/ (the result is committed).
proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

## Benchmarks: kmsd against a bare gRPC service doing the same AES-GCM work.
bench: $(STAMP)
	$(BIN)/python -m bench.data_plane

## Cluster benchmarks: 3-node kmsd vs 3-node etcd writes, failover, fsync floor.
bench-cluster: $(STAMP)
	$(BIN)/python -m bench.cluster

## Build the images (no registry) and run the docker-compose tests; needs root or docker.
compose-test: $(STAMP)
	$(BIN)/pytest tests/compose -q -s

## Long chaos soak: real nodes under kills, pauses, partitions, slow links and torn WAL
## tails, histories checked. KMSD_CHAOS_SECONDS (default 600), KMSD_CHAOS_SEEDS,
## KMSD_CHAOS_NODES (3|5), KMSD_CHAOS_FAULTS.
chaos: $(STAMP)
	KMSD_CHAOS_SECONDS=$${KMSD_CHAOS_SECONDS:-600} $(BIN)/pytest tests/chaos/test_chaos_soak.py -q -s

clean:
	rm -rf $(VENV) .kmsd-dev .pytest_cache .mypy_cache .ruff_cache
