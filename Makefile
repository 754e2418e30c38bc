# rankserve: every target sets up what it needs, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data

.PHONY: setup proto test test-fault test-fast lint typecheck demo loadtest bench clean redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[train,dev,loadtest,otel]'
	$(MAKE) --no-print-directory proto
	touch $(STAMP)

setup: $(STAMP)

# gRPC stubs are generated from service/transports/grpc/proto/*.proto, never hand-written or committed.
proto:
	$(PY) -m service.transports.grpc.proto.codegen

# Debian's redis-server (and redis-cli for the Cluster fixture): the tests' second real backend.
redis-server:
	@command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || \
	  { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

test: setup redis-server
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy service export feature_store models ingest
	$(PY) -m pytest -q -p no:cacheprovider -m "not fault" tests
	$(MAKE) --no-print-directory test-fault

# fault injection: Redis killed and slowed, bad bundles, SIGTERM under load, a 5,000-request soak (~2 min)
test-fault: setup redis-server
	$(PY) -m pytest -q -p no:cacheprovider -m fault tests

test-fast: setup
	$(PY) -m pytest -q -x tests/unit

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(PY) -m mypy service export feature_store models ingest

demo: setup
	$(PY) -m service.demo --data $(DATA)

loadtest: setup
	$(PY) -m loadtest.run --out loadtest/reports

bench: setup
	$(PY) -m service.cli bench

clean:
	rm -rf $(VENV) build dist *.egg-info runs bundles loadtest/reports
