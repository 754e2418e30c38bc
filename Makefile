# rankserve: every target sets up what it needs, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DATA   ?= $(or $(RANKSERVE_DATA_ROOT),../shared/data)

.PHONY: setup proto test test-fault test-fast lint typecheck demo loadtest bench bench-gpu clean redis-server prometheus

$(STAMP): pyproject.toml constraints/serving.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/serving.txt -e '.[train,dev,loadtest,otel]'
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

# Debian's prometheus (the server and promtool): the alert rules' unit tests and a real scrape of
# a two-worker server (tests/deploy/test_monitoring.py, tests/e2e/test_prometheus.py).
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
	  { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: setup redis-server prometheus
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy service export feature_store models ingest
	$(PY) -m pytest -q -p no:cacheprovider -m "not fault and not image" tests
	$(MAKE) --no-print-directory test-fault
	$(MAKE) --no-print-directory test-image

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

# The GPU paths of the benchmark (docs/PERFORMANCE.md#gpu): faiss GPU and exact retrieval on GPU, ONNX Runtime
# CUDA and TensorRT, the in-process core and REST/gRPC servers with the CUDA provider and GPU retrieval.
# Refuses (exit 2, one line) without a CUDA device, checked before the gpu extra is downloaded, and again
# after it is installed without onnxruntime's CUDA provider or faiss GPU; never falls back to CPU.
# Writes $(BENCH_GPU_OUT)/bench-gpu.json and bench-gpu.md. Extra bench flags: BENCH_GPU_ARGS='--iterations 500'.
# It installs into $(VENV); `make bench-gpu VENV=.venv-gpu` keeps the GPU wheels out of the development venv.
BENCH_GPU_OUT  ?= bench-gpu
BENCH_GPU_ARGS ?=
GPU_STAMP      := $(VENV)/.installed-gpu

# onnxruntime-gpu and faiss-gpu-cu12 ship the same Python packages (onnxruntime/, faiss/) as the CPU wheels the
# base install requires: the CPU wheels are taken out, and the GPU wheels reinstalled over the files that took
$(GPU_STAMP): $(STAMP)
	$(PIP) install -q -c constraints/serving.txt -e '.[gpu]'
	$(PIP) uninstall -q -y onnxruntime faiss-cpu
	$(PIP) install -q -c constraints/serving.txt --force-reinstall --no-deps 'onnxruntime-gpu>=1.20,<1.26' 'faiss-gpu-cu12>=1.8'
	touch $(GPU_STAMP)

bench-gpu: setup
	@$(PY) -m loadtest.bench_gpu --device-only >/dev/null
	@$(MAKE) --no-print-directory $(GPU_STAMP)
	@mkdir -p $(BENCH_GPU_OUT)
	$(PY) -m service.cli bench --gpu --out $(BENCH_GPU_OUT)/bench-gpu.json --out-md $(BENCH_GPU_OUT)/bench-gpu.md $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info runs bundles loadtest/reports bench-gpu

# -- the serving image, built with podman (buildah) on a base image made from Debian's packages ------
# Docker is not needed: mmdebstrap writes a minimal Debian with python3 into a tarball, `podman
# import` turns it into $(BASE_IMAGE) (both cached: a second `make image` reuses them), and
# `podman build` builds the Dockerfile's runtime-cpu target on it. vfs storage and chroot isolation
# work without a container runtime or kernel overlay support (docs/DEPLOY.md).
.PHONY: image image-base image-tools image-clean test-image constraints

IMAGE       ?= localhost/rankserve:cpu
BASE_IMAGE  ?= localhost/rankserve-base:bookworm
IMAGE_BUILD := build/image
BASE_TAR    := $(IMAGE_BUILD)/rankserve-base-bookworm.tar
PODMAN      := podman --storage-driver vfs --cgroup-manager cgroupfs
# apt sources for mmdebstrap: this host's Debian ones (empty: mmdebstrap's default mirror)
DEBIAN_SOURCES ?= $(firstword $(wildcard /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list))
# A CA bundle that pip inside the build must trust (a TLS-intercepting proxy): the one pip's `cert`
# setting names here, by default. It and a pip.conf naming it are mounted as root's pip config
# directory into the build's RUN steps only (what a layer keeps is the empty directory).
PIP_BUILD_CERT ?= $(or $(PIP_CERT),$(shell $(PYTHON) -m pip config get global.cert 2>/dev/null))
IMAGE_BUILD_FLAGS := --isolation chroot --network host --format docker --pull=never \
	$(if $(PIP_BUILD_CERT),-v $(CURDIR)/$(IMAGE_BUILD)/pip:/root/.config/pip:ro)

image-tools:
	@command -v mmdebstrap >/dev/null 2>&1 && command -v podman >/dev/null 2>&1 && command -v buildah >/dev/null 2>&1 \
	  && command -v newuidmap >/dev/null 2>&1 || \
	  { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    mmdebstrap podman buildah uidmap >/dev/null; }

# python3 (Debian's 3.11), venv (with pip) and libstdc++ (grpcio, onnxruntime, faiss); no docs, man pages
# or locales; /usr merged by mmdebstrap's hook rather than by the usrmerge package, which pulls in perl (50 MB)
$(BASE_TAR):
	@mkdir -p $(IMAGE_BUILD)
	mmdebstrap --quiet --format=tar --variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	  --include=passwd,python3,python3-venv,python-is-python3,libstdc++6 \
	  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
	  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
	  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	  bookworm $@.tmp $(DEBIAN_SOURCES)
	mv $@.tmp $@

image-base: image-tools
	@$(PODMAN) image exists $(BASE_IMAGE) || { $(MAKE) --no-print-directory $(BASE_TAR) && \
	  $(PODMAN) import --quiet --change 'CMD ["python3"]' $(BASE_TAR) $(BASE_IMAGE) >/dev/null; }

image: image-base
	$(if $(PIP_BUILD_CERT),@mkdir -p $(IMAGE_BUILD)/pip && cp $(PIP_BUILD_CERT) $(IMAGE_BUILD)/pip/build-ca.crt \
	  && printf '[global]\ncert = /root/.config/pip/build-ca.crt\n' > $(IMAGE_BUILD)/pip/pip.conf)
	$(PODMAN) build $(IMAGE_BUILD_FLAGS) --build-arg PYTHON_IMAGE=$(BASE_IMAGE) --target runtime-cpu -t $(IMAGE) .
	@$(PODMAN) images --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(IMAGE)

# removes both images, the build cache (podman's dangling images: with vfs, several GB) and the base tarball
image-clean:
	-$(PODMAN) rmi --force $(IMAGE) $(BASE_IMAGE) 2>/dev/null
	-$(PODMAN) image prune --force >/dev/null 2>&1
	rm -rf $(IMAGE_BUILD)

# builds the CPU image (`make image`), runs it as its non-root user against a Redis on loopback,
# ranks over REST and gRPC, prints build time, size, start-to-ready and first-rank latency
test-image: setup redis-server image-tools
	$(PY) -m pytest -q -p no:cacheprovider -m image tests

# the pins of constraints/serving.txt, from the development venv (constraints/freeze.py says how to upgrade)
constraints: setup
	$(PY) constraints/freeze.py > constraints/serving.txt.tmp && mv constraints/serving.txt.tmp constraints/serving.txt
