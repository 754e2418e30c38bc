#!/bin/sh
# Container entrypoint of the rankserve image: prepare the writable paths, then exec the command.
#
# 1. numba's on-disk kernel cache. The image carries kernels compiled at build time in
#    $NUMBA_CACHE_SEED (read-only: the root filesystem is read-only in Kubernetes), but numba only
#    uses a cache directory it can write to, even for reading. So the seed is copied into
#    $NUMBA_CACHE_DIR (an emptyDir / tmpfs) once; without this every pod would JIT the retrieval
#    kernels again (~15-30 s) before it can serve.
# 2. GPU build: CUDA and cuDNN come from NVIDIA's pip wheels inside the venv; the dynamic loader
#    only reads LD_LIBRARY_PATH at process start, so it is set here, before exec.
set -eu

if [ -n "${NUMBA_CACHE_DIR:-}" ] && [ -n "${NUMBA_CACHE_SEED:-}" ] && [ -d "$NUMBA_CACHE_SEED" ]; then
    if mkdir -p "$NUMBA_CACHE_DIR" 2>/dev/null && [ -w "$NUMBA_CACHE_DIR" ]; then
        if [ -z "$(ls -A "$NUMBA_CACHE_DIR")" ]; then
            cp -R "$NUMBA_CACHE_SEED/." "$NUMBA_CACHE_DIR/" \
                || echo "rankserve-entrypoint: could not seed $NUMBA_CACHE_DIR; kernels compile at first use" >&2
        fi
    else
        echo "rankserve-entrypoint: $NUMBA_CACHE_DIR is not writable; mount an emptyDir there" >&2
    fi
fi

for lib in "${RANKSERVE_VENV:-/opt/venv}"/lib/python3*/site-packages/nvidia/*/lib; do
    if [ -d "$lib" ]; then
        LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"

exec "$@"
