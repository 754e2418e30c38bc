# syntax=docker/dockerfile:1.7
#
# rankserve serving image: REST :8000 + gRPC :50051, no torch.
#
#   docker build -t rankserve:cpu .                              # CPU (default)
#   docker build --build-arg VARIANT=gpu -t rankserve:gpu .      # onnxruntime-gpu + faiss-gpu
#
#   docker run --rm -p 8000:8000 -p 50051:50051 --read-only --tmpfs /tmp --tmpfs /var/cache/numba \
#     -v "$PWD/bundles:/models:ro" -e REDIS_URL=redis://:PASSWORD@redis:6379/0 rankserve:cpu
#
# Stages: `builder-base` (a venv + the gRPC stubs generated from the .proto), `deps-cpu` /
# `deps-gpu` (the project installed into the venv), `builder` (numba kernels compiled into a
# cache), `runtime` (slim, non-root, only the venv and the cache). tests/deploy/ checks this file
# with hadolint, checks that everything it COPYs exists, and replays its install steps in a fresh
# venv (no torch).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# cpu | gpu: which `deps-*` stage the builder starts from
ARG VARIANT=cpu

# -- builder-base: a virtual environment and the generated gRPC stubs -------------------------------
FROM ${PYTHON_IMAGE} AS builder-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
# grpcio-tools only generates the stubs: it goes into the build stage's system Python, not the venv
RUN python -m venv /opt/venv \
    && python -m pip install --no-cache-dir "grpcio-tools==1.85.1"
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY export ./export
COPY feature_store ./feature_store
COPY models ./models
COPY ingest ./ingest
# gRPC stubs are generated at build time and never committed (see service/transports/grpc/proto/codegen.py)
RUN python -m service.transports.grpc.proto.codegen

# -- deps-cpu / deps-gpu: the serving install (only the otel extra: never torch) ---------------------
FROM builder-base AS deps-cpu
# OpenTelemetry is in the image so that tracing is one setting away (RANKSERVE_OTEL_ENDPOINT)
RUN pip install --no-cache-dir "./[otel]"

FROM builder-base AS deps-gpu
# CUDA 12 throughout: faiss-gpu-cu12 is built for CUDA 12, and onnxruntime-gpu moved to CUDA 13
# with 1.26. The [cuda,cudnn] extras bring CUDA and cuDNN as NVIDIA's pip wheels, so the runtime
# needs no CUDA base image: only the host's driver, which the NVIDIA container runtime mounts.
# The base dependencies name onnxruntime and faiss-cpu, which provide the same import packages as
# their GPU builds: install, remove the CPU builds, then add the GPU ones.
RUN pip install --no-cache-dir "./[otel]" \
    && pip uninstall -y onnxruntime faiss-cpu \
    && pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]>=1.20,<1.26" "faiss-gpu-cu12>=1.8"

# -- builder: compile the retrieval kernels into numba's on-disk cache -------------------------------
# (DL3006 wants a tag; this names one of the stages above, chosen by the VARIANT build argument)
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS builder
# Compiling for a named baseline CPU (AVX2 + FMA, i.e. any x86-64 server since ~2015) rather than
# the build host's exact model makes the cache valid on every node: numba keys cache entries by
# CPU name and feature string, so a host-specific cache misses on any other CPU model and each pod
# would pay the ~15-30 s JIT again. Measured on an AVX-512 host: the same search speed as native.
# Set NUMBA_CPU_NAME=generic for CPUs without AVX2 (or arm64 builds).
ARG NUMBA_CPU_NAME=x86-64-v3
ENV NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    NUMBA_CPU_FEATURES="" \
    NUMBA_CACHE_DIR=/opt/numba-cache
# Out of /src: `python -c` puts the working directory on sys.path, and these must import (and
# numba must key its cache to) the installed package, at the path the runtime stage has too.
WORKDIR /opt
RUN python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "from service.retrieval import warm_up; warm_up()" \
    && python -c "import service.transports.rest.app, service.transports.grpc.server"

# -- runtime ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
ARG NUMBA_CPU_NAME=x86-64-v3
LABEL org.opencontainers.image.title="rankserve" \
      org.opencontainers.image.description="Online ranking microservice (REST + gRPC), ${VARIANT} build" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot without a user database lookup
RUN groupadd --system --gid 10001 rankserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin rankserve
COPY --from=builder /opt/venv /opt/venv
# The compiled kernels, read-only here; the entrypoint copies them into the writable
# NUMBA_CACHE_DIR (numba refuses a cache directory it cannot write, even just to read it).
COPY --from=builder /opt/numba-cache /opt/numba-cache
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/rankserve-entrypoint
# The last two: OpenMP pools (numba's, faiss's) sleep after a parallel region instead of spinning
# for milliseconds on the cores the next stage needs, and ONNX Runtime scores on the request's own
# thread; together they halve the CPU a request costs on 2 cores (docs/PERFORMANCE.md). Scale with
# RANKSERVE_WORKERS, one worker process per core, rather than with intra-op threads.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    NUMBA_CPU_FEATURES="" \
    NUMBA_CACHE_DIR=/var/cache/numba \
    NUMBA_CACHE_SEED=/opt/numba-cache \
    RANKSERVE_HOST=0.0.0.0 \
    RANKSERVE_HTTP_PORT=8000 \
    RANKSERVE_GRPC_PORT=50051 \
    RANKSERVE_MODEL_DIR=/models \
    RANKSERVE_FEATURE_STORE__EMBEDDED__DATA_DIR=/tmp/rankserve-valkey \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    OMP_WAIT_POLICY=PASSIVE \
    RANKSERVE_SCORER_THREADS=1
# /tmp and the numba cache are the only paths written at run time (emptyDir / tmpfs in k8s)
RUN mkdir -p /var/cache/numba /models \
    && chown 10001:10001 /var/cache/numba
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 50051
# /livez answers as soon as the process listens, also while a model loads (readiness is /readyz)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('RANKSERVE_HTTP_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["rankserve-entrypoint"]
CMD ["rankserve", "serve"]
