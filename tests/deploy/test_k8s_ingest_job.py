"""The sharded feature load (k8s/jobs/ingest): an Indexed Job whose pods run `rankserve ingest
--shard $(JOB_COMPLETION_INDEX)/N` against the Redis Cluster. It renders, validates against the
pinned Kubernetes schema (strict), runs N shards with per-index retries, passes the ingest
command line's own parser, and takes the store from the same settings and Secret as the server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.conftest import K8S, REPO, find, render_dir
from tests.deploy.test_k8s import KUBERNETES_VERSION

pytestmark = pytest.mark.timeout(120)

JOB_DIR = K8S / "jobs" / "ingest"


def objects() -> tuple[dict[str, Any], ...]:
    return render_dir(JOB_DIR)


def job() -> dict[str, Any]:
    return find(objects(), "Job", "rankserve-ingest")


def pod_spec() -> dict[str, Any]:
    return dict(job()["spec"]["template"]["spec"])


def ingest_container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return dict(c)


def job_env() -> dict[str, str]:
    (cm,) = [o for o in objects() if o["kind"] == "ConfigMap"]
    return dict(cm["data"])


def shard_count() -> int:
    (arg,) = [a for a in ingest_container()["args"] if a.startswith("--shard")]
    m = re.fullmatch(r"--shard[= ]\$\(JOB_COMPLETION_INDEX\)/(\d+)", arg)
    assert m, f"the shard index must come from JOB_COMPLETION_INDEX: {arg}"
    return int(m.group(1))


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], arg)


def test_every_object_validates() -> None:
    import kubernetes_validate

    kinds = sorted(o["kind"] for o in objects())
    assert kinds == ["ConfigMap", "Job"]
    for obj in objects():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")
    assert {o["metadata"]["namespace"] for o in objects()} == {"rankserve"}


def test_an_indexed_job_of_n_shards() -> None:
    spec = job()["spec"]
    n = shard_count()
    assert n >= 2
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == n, "every shard runs, all at once"
    assert spec.get("backoffLimitPerIndex", 0) >= 1 or spec.get("backoffLimit", 0) >= 1
    if "backoffLimitPerIndex" in spec:
        assert pod_spec()["restartPolicy"] == "Never"  # what the API requires with per-index limits
    env = {e["name"]: e for e in ingest_container()["env"]}
    ref = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ref == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    resources = ingest_container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_args_are_an_ingest_command_line_for_every_index() -> None:
    from ingest.bulk import Shard, shard_from_args
    from service.cli import build_parser

    c = ingest_container()
    assert c["args"][:2] == ["rankserve", "ingest"]
    env = job_env()
    (ref,) = c["envFrom"]
    (cm,) = [o for o in objects() if o["kind"] == "ConfigMap"]
    assert ref["configMapRef"]["name"] == cm["metadata"]["name"]  # the generated (hashed) name
    parser = build_parser("ingest")
    n = shard_count()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for index in range(n):
        argv = [expand(a, {**env, "JOB_COMPLETION_INDEX": str(index)}) for a in c["args"][1:]]
        args = parser.parse_args(argv)
        assert shard_from_args(args, upsert=False) == Shard(index, n)
        assert args.version == env["INGEST_VERSION"] and args.resume and args.activate and args.no_progress
        assert str(args.schema).startswith("/models/") and mounts["/models"]["readOnly"] is True
        assert str(args.data_root) in mounts and mounts[str(args.data_root)]["readOnly"] is True


def test_the_store_is_the_servers_redis_cluster() -> None:
    from feature_store.store import FeatureStoreConfig

    base = dict(
        line.split("=", 1) for line in (K8S / "base" / "settings.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    env = job_env()
    assert env["REDIS_CLUSTER_NODES"] == base["REDIS_CLUSTER_NODES"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ingest_container()["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"REDIS_URL": {"name": "rankserve-redis", "key": "url"}}
    config = FeatureStoreConfig.from_env({**env, "REDIS_URL": "rediss://:example@redis.example:6379/0"})
    assert config.resolved_mode() == "cluster"
    for key, value in env.items():
        assert not re.search(r"(TOKEN|PASSWORD|SECRET)", key), key
        assert "@" not in value, key


def test_pod_security() -> None:
    spec = pod_spec()
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = ingest_container()["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    mounts = {m["mountPath"] for m in ingest_container()["volumeMounts"]}
    assert "/tmp" in mounts  # the only place written at run time, besides the numba cache


def test_the_deploy_doc_runs_it() -> None:
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    assert "kubectl apply -k k8s/jobs/ingest" in doc
    assert "--finish-shards" in doc
