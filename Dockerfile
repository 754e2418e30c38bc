# syntax=docker/dockerfile:1.7
#
# rankserve serving image: REST :8000 + gRPC :50051, no torch.
#
#   docker build -t rankserve:cpu .                              # CPU (the default target: runtime-cpu)
#   docker build --target runtime-gpu -t rankserve:gpu .         # onnxruntime-gpu + faiss-gpu
#   make image                                                   # CPU, with podman on a Debian base
#
#   docker run --rm -p 8000:8000 -p 50051:50051 --read-only --tmpfs /tmp --tmpfs /var/cache/numba \
#     -v "$PWD/bundles:/models:ro" -e REDIS_URL=redis://:PASSWORD@redis:6379/0 rankserve:cpu
#
# Stages: `builder-base` (a venv + the gRPC stubs generated from the .proto), `deps-cpu` /
# `deps-gpu` (the project installed into the venv, versions from constraints/serving.txt),
# `builder-cpu` / `builder-gpu` (the venv trimmed, numba kernels compiled into a cache),
# `runtime-base` (slim, non-root, no packages of its own), `runtime-gpu` / `runtime-cpu`
# (runtime-base plus one builder's venv and cache). One final target per variant, each copying
# from its own builder: no stage is chosen through a build argument, which BuildKit resolves but
# buildah (podman build) does not. tests/deploy/ checks this file with hadolint, checks that
# everything it COPYs exists, replays its install steps in a fresh venv (no torch), and builds and
# runs the CPU image (`make test-image`).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- builder-base: a virtual environment and the generated gRPC stubs -------------------------------
FROM ${PYTHON_IMAGE} AS builder-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY constraints/serving.txt ./constraints/
COPY service ./service
COPY export ./export
COPY feature_store ./feature_store
COPY models ./models
COPY ingest ./ingest
# gRPC stubs are generated at build time and never committed (see service/transports/grpc/proto/codegen.py).
# grpcio-tools only generates them: it gets a venv of its own outside /opt, so it never reaches the
# image (the runtime stages copy /opt/venv and nothing else of this stage).
RUN python -m venv /opt/venv \
    && python -m venv /usr/local/codegen \
    && /usr/local/codegen/bin/pip install --no-cache-dir -c constraints/serving.txt "grpcio-tools==1.85.1" \
    && /usr/local/codegen/bin/python -m service.transports.grpc.proto.codegen

# -- deps-cpu / deps-gpu: the serving install (only the otel extra: never torch, never pandas) ------
# Every version comes from constraints/serving.txt (generated from the tested development venv).
FROM builder-base AS deps-cpu
# OpenTelemetry is in the image so that tracing is one setting away (RANKSERVE_OTEL_ENDPOINT)
RUN pip install --no-cache-dir -c constraints/serving.txt "./[otel]"

FROM builder-base AS deps-gpu
# CUDA 12 throughout: faiss-gpu-cu12 is built for CUDA 12, and onnxruntime-gpu moved to CUDA 13
# with 1.26. The [cuda,cudnn] extras bring CUDA and cuDNN as NVIDIA's pip wheels, so the runtime
# needs no CUDA base image: only the host's driver, which the NVIDIA container runtime mounts.
# The base dependencies name onnxruntime and faiss-cpu, which provide the same import packages as
# their GPU builds: install, remove the CPU builds, then add the GPU ones.
RUN pip install --no-cache-dir -c constraints/serving.txt "./[otel]" \
    && pip uninstall -y onnxruntime faiss-cpu \
    && pip install --no-cache-dir -c constraints/serving.txt "onnxruntime-gpu[cuda,cudnn]>=1.20,<1.26" "faiss-gpu-cu12>=1.8"

# -- builder-cpu / builder-gpu: trim the venv, compile the retrieval kernels into numba's cache ------
# The same steps on each variant's deps stage (tests/deploy checks that the two agree):
# 1. trim what serving never uses: pip and setuptools (nothing is installed at run time), the
#    packages' own test suites (numpy, numba, llvmlite, ...), type stubs and Cython sources, and
#    ONNX Runtime's model tooling (transformers, quantization, tools: Python only, never imported
#    by an InferenceSession); bytecode is dropped here and written again in steps 3 and 4 for
#    exactly the modules that serving imports, so start-up stays fast and the rest costs nothing;
# 2. fail if torch is importable;
# 3. compile the kernels, for a named baseline CPU (AVX2 + FMA, i.e. any x86-64 server since ~2015)
#    rather than the build host's exact model, which makes the cache valid on every node: numba keys
#    cache entries by CPU name and feature string, so a host-specific cache misses on any other CPU
#    model and each pod would pay the ~15-30 s JIT again. Measured on an AVX-512 host: the same
#    search speed as native. Set NUMBA_CPU_NAME=generic for CPUs without AVX2 (or arm64 builds);
# 4. import the server, both transports and the scorer's and retrieval's libraries, which proves
#    the trimmed venv still serves (with the CUDA wheels' libraries on LD_LIBRARY_PATH, as the
#    entrypoint sets them; none in the CPU build).
# Out of /src: `python -c` puts the working directory on sys.path, and these must import (and
# numba must key its cache to) the installed package, at the path the runtime stages have too.
FROM deps-cpu AS builder-cpu
ARG NUMBA_CPU_NAME=x86-64-v3
ENV NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    NUMBA_CPU_FEATURES="" \
    NUMBA_CACHE_DIR=/opt/numba-cache
WORKDIR /opt
RUN pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} + \
    && find /opt/venv -type f \( -name "*.pyi" -o -name "*.pyx" -o -name "*.pxd" \) -delete \
    && rm -rf /opt/venv/lib/python3*/site-packages/onnxruntime/tools \
              /opt/venv/lib/python3*/site-packages/onnxruntime/transformers \
              /opt/venv/lib/python3*/site-packages/onnxruntime/quantization \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && PYTHONDONTWRITEBYTECODE='' python -c "from service.retrieval import warm_up; warm_up()" \
    && libs="$(find /opt/venv -type d -path '*/site-packages/nvidia/*/lib' -printf '%p:')" \
    && LD_LIBRARY_PATH="${libs%:}" PYTHONDONTWRITEBYTECODE='' \
       python -c "import service.server, service.transports.rest.app, service.transports.grpc.server, onnxruntime, faiss"

FROM deps-gpu AS builder-gpu
ARG NUMBA_CPU_NAME=x86-64-v3
ENV NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    NUMBA_CPU_FEATURES="" \
    NUMBA_CACHE_DIR=/opt/numba-cache
WORKDIR /opt
RUN pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} + \
    && find /opt/venv -type f \( -name "*.pyi" -o -name "*.pyx" -o -name "*.pxd" \) -delete \
    && rm -rf /opt/venv/lib/python3*/site-packages/onnxruntime/tools \
              /opt/venv/lib/python3*/site-packages/onnxruntime/transformers \
              /opt/venv/lib/python3*/site-packages/onnxruntime/quantization \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && PYTHONDONTWRITEBYTECODE='' python -c "from service.retrieval import warm_up; warm_up()" \
    && libs="$(find /opt/venv -type d -path '*/site-packages/nvidia/*/lib' -printf '%p:')" \
    && LD_LIBRARY_PATH="${libs%:}" PYTHONDONTWRITEBYTECODE='' \
       python -c "import service.server, service.transports.rest.app, service.transports.grpc.server, onnxruntime, faiss"

# -- runtime-base: what both variants share: user, environment, entrypoint, health check -------------
FROM ${PYTHON_IMAGE} AS runtime-base
ARG NUMBA_CPU_NAME=x86-64-v3
LABEL org.opencontainers.image.title="rankserve" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot without a user database lookup.
# /tmp and the numba cache are the only paths written at run time (emptyDir / tmpfs in k8s).
RUN groupadd --system --gid 10001 rankserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin rankserve \
    && mkdir -p /var/cache/numba /models \
    && chown 10001:10001 /var/cache/numba
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
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 50051
# /livez answers as soon as the process listens, also while a model loads (readiness is /readyz)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('RANKSERVE_HTTP_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["rankserve-entrypoint"]
CMD ["rankserve", "serve"]

# -- runtime-gpu / runtime-cpu: runtime-base plus one builder's venv and kernel cache ----------------
# The compiled kernels are read-only in /opt/numba-cache; the entrypoint copies them into the
# writable NUMBA_CACHE_DIR (numba refuses a cache directory it cannot write, even just to read it).
# The cache first: it is small, and every layer of a build is a copy of the tree below it.
FROM runtime-base AS runtime-gpu
LABEL org.opencontainers.image.description="Online ranking microservice (REST + gRPC), gpu build"
COPY --from=builder-gpu /opt/numba-cache /opt/numba-cache
COPY --from=builder-gpu /opt/venv /opt/venv

# Last, so that a plain `docker build` builds it.
FROM runtime-base AS runtime-cpu
LABEL org.opencontainers.image.description="Online ranking microservice (REST + gRPC), cpu build"
COPY --from=builder-cpu /opt/numba-cache /opt/numba-cache
COPY --from=builder-cpu /opt/venv /opt/venv
