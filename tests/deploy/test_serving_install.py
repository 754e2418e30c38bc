"""The Dockerfile's install steps, replayed without Docker in a fresh virtual environment.

The build context is assembled from .dockerignore exactly as `docker build` would send it; the
gRPC stubs are generated in it (the `builder-base` stage); the project is installed with only the
otel extra at the versions of constraints/serving.txt (`deps-cpu`); torch and pandas must not be
importable and the serving modules and the event consumer must import (`builder-cpu`); the
retrieval kernels are compiled into a numba cache for the image's baseline CPU, and a second
process started through docker/entrypoint.sh with only that cache as its seed (the `runtime-cpu`
stage) must load them without compiling. tests/deploy/test_image.py builds and runs the image itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import dockerfile as df

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IMPORT_CHECK = """
import importlib.util, sys
import service.transports.rest.app, service.transports.grpc.server, service.server
assert importlib.util.find_spec("torch") is None, "torch is installed"
assert "torch" not in sys.modules
# the data-set readers (rankserve ingest, train) are the `data` extra: serving never needs pandas
assert importlib.util.find_spec("pandas") is None and importlib.util.find_spec("pyarrow") is None
assert importlib.util.find_spec("grpc_tools") is None, "grpcio-tools is a build-time tool, not a serving dependency"
import service.transports.grpc.proto.ranker_pb2 as pb2
from service.settings import Settings
from service.observability.tracing import Tracing
assert Tracing.from_settings(Settings(otel_endpoint="http://127.0.0.1:4317")) is not None  # the otel extra
# the event consumer (`rankserve consume`) runs from the serving image too
import ingest.stream
from service.cli import build_parser
build_parser("consume").parse_args(["consume", "--shards=8", "--metrics-port=9108"])
assert not {"torch", "pandas", "pyarrow"} & set(sys.modules), "the consumer imports a training dependency"
print(service.transports.rest.app.__file__)
print(pb2.__file__)
"""

WARM_UP = "from service.retrieval import warm_up; print(warm_up())"


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def test_serving_install_without_torch(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for rel in df.context_files():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(df.REPO / rel, context / rel)
    assert not list(context.rglob("*_pb2*.py")), "stubs must come from the build, not the context"

    # builder-base: stubs generated inside the context (this interpreter has grpcio-tools, as the
    # build stage's system Python does)
    codegen = [sys.executable, "-m", "service.transports.grpc.proto.codegen"]
    subprocess.run(codegen, cwd=context, check=True, timeout=120)
    assert (context / "service" / "transports" / "grpc" / "proto" / "ranker_pb2_grpc.py").exists()

    # deps-cpu: `pip install -c constraints/serving.txt "./[otel]"` into a fresh venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "NUMBA_"))}
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "-c", str(context / "constraints" / "serving.txt"), f"{context}/[otel]"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    # builder-cpu: out of the context (cwd would shadow the installed package), as the Dockerfile does
    work = tmp_path / "work"
    work.mkdir()
    checked = subprocess.run([str(python), "-c", IMPORT_CHECK], cwd=work, env=env, capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in checked.stdout.split()), checked.stdout
    assert (venv / "bin" / "rankserve").exists()

    build_cache = tmp_path / "opt-numba-cache"
    numba_env = {**env, "NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": ""}
    compiled = subprocess.run([str(python), "-c", WARM_UP], cwd=work,
                              env={**numba_env, "NUMBA_CACHE_DIR": str(build_cache)},
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert list(build_cache.rglob("*.nbi")), "no kernels were cached"

    # runtime-cpu: the entrypoint seeds an empty NUMBA_CACHE_DIR; the kernels load from it unchanged
    runtime_cache = tmp_path / "var-cache-numba"
    runtime_env = {**numba_env, "NUMBA_CACHE_DIR": str(runtime_cache), "NUMBA_CACHE_SEED": str(build_cache),
                   "RANKSERVE_VENV": str(venv)}
    loaded = subprocess.run([str(df.REPO / "docker" / "entrypoint.sh"), str(python), "-c", WARM_UP], cwd=work,
                            env=runtime_env, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    # a cache hit writes nothing; a miss would have rewritten the index files with new entries
    assert _files(runtime_cache) == _files(build_cache)
    compile_s, load_s = float(compiled.stdout.split()[-1]), float(loaded.stdout.split()[-1])
    assert load_s < compile_s / 3, (compile_s, load_s)
    print(f"kernels: compiled in {compile_s:.1f} s at build, loaded from the seeded cache in {load_s:.2f} s")
