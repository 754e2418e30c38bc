"""The event consumer (k8s/base/consumer.yaml): in every overlay a Deployment runs `rankserve
consume` from the serving image, with a command line the consume parser accepts, the store and
the shard count from the very settings the server reads, probes on the port its metrics server
listens on, the server's pod security, a grace period that covers finishing a batch and handing
the shards back, and a PodDisruptionBudget, a metrics Service and a NetworkPolicy of its own."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from tests.deploy.conftest import REPO, find, render
from tests.deploy.test_k8s import KUBERNETES_VERSION, SERVER_LABELS, container, settings_env

pytestmark = pytest.mark.timeout(120)

CONSUMER_LABELS = {**SERVER_LABELS, "app.kubernetes.io/component": "consumer"}
SECRET_PLACEHOLDER = "rediss://:example@redis.example:6379/0"  # what the Secret rankserve-redis provides

# Redis calls of one consumer step at most (heartbeat, lease renewal, acquisition, read, version,
# schema, items, appends, dead letters, lag) and of the shutdown after it (acknowledge, release
# the leases, leave the live set), each bounded by --timeout (ingest/stream.py).
STEP_CALLS, RELEASE_CALLS = 10, 3


def consumer(overlay: str) -> dict[str, Any]:
    return find(render(overlay), "Deployment", "rankserve-consumer")


def consumer_container(overlay: str) -> dict[str, Any]:
    return container(consumer(overlay), "consumer")


def resolved_env(overlay: str, c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env (values,
    ConfigMap keys from the rendered ConfigMaps, Secret keys as the placeholder the operator's
    Secret would give)."""
    objects = render(overlay)
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "configMapKeyRef" in ref:
            key_ref = ref["configMapKeyRef"]
            data = maps.get(key_ref["name"])
            if data is None or key_ref["key"] not in data:
                assert key_ref.get("optional"), f"{e['name']}: {key_ref} is missing and not optional"
                continue
            env[e["name"]] = data[key_ref["key"]]
        elif "secretKeyRef" in ref:
            env[e["name"]] = SECRET_PLACEHOLDER if e["name"] == "REDIS_URL" else f"example-{e['name'].lower()}"
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args; an undefined reference would stay as it is."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{arg}: ${m.group(1)} is not in the container's environment"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def parsed_args(overlay: str) -> Any:
    from service.cli import build_parser

    c = consumer_container(overlay)
    argv = [expand(a, resolved_env(overlay, c)) for a in c["args"][1:]]
    return build_parser("consume").parse_args(argv)


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def test_the_consumer_objects_render_and_validate(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
        obj = find(objects, kind, "rankserve-consumer")
        assert obj["metadata"]["namespace"] == "rankserve"
        assert CONSUMER_LABELS.items() <= obj["metadata"]["labels"].items()
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {kind}/rankserve-consumer at {'/'.join(map(str, exc.path))}: {exc.message}")
    bad = copy.deepcopy(consumer(overlay))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_runs_rankserve_consume_from_the_serving_image(overlay: str) -> None:
    c = consumer_container(overlay)
    assert c["args"][:2] == ["rankserve", "consume"]
    assert "command" not in c, "the image's entrypoint stays (it execs the args)"
    server = container(find(render(overlay), "Deployment", "rankserve"))
    assert c["image"] == server["image"] and c["imagePullPolicy"] == server["imagePullPolicy"]
    assert "resources" in c and "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_the_consume_parser_accepts_the_args(overlay: str) -> None:
    from ingest.stream import ConsumerConfig

    args = parsed_args(overlay)
    assert args.command == "consume"
    config = ConsumerConfig(shards=args.shards, batch=args.batch, lease_ms=args.lease_ms)  # what `run` builds
    assert config.shards == int(settings_env(render(overlay))["RANKSERVE_EVENT_SHARDS"])
    assert args.metrics_port == ports(consumer_container(overlay))["metrics"]
    assert args.redis_url is None and args.cluster_nodes is None, "the store comes from the environment"
    assert args.name is None, "each replica (and each restart) needs its own consumer name: keep the default"


def test_the_store_and_the_shard_count_are_the_servers(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One value each: the consumer reads the keys of the ConfigMap the server reads whole, and the
    Secret the server reads, so they cannot point at different stores or shard counts."""
    from feature_store.store import FeatureStoreConfig
    from service.settings import Settings

    objects = render(overlay)
    server = container(find(objects, "Deployment", "rankserve"))
    c = consumer_container(overlay)
    (settings_ref,) = server["envFrom"]
    settings_name = settings_ref["configMapRef"]["name"]
    assert settings_name.startswith("rankserve-settings-")  # the generated, hashed name
    server_env = {e["name"]: e for e in server["env"]}
    consumer_env = {e["name"]: e for e in c["env"]}
    for key in ("REDIS_CLUSTER_NODES", "RANKSERVE_EVENT_SHARDS"):
        ref = consumer_env[key]["valueFrom"]["configMapKeyRef"]
        assert (ref["name"], ref["key"]) == (settings_name, key)
        assert key not in server_env, f"the server must read {key} from the ConfigMap, not set it apart"
    assert "envFrom" not in c
    assert consumer_env["REDIS_URL"]["valueFrom"] == server_env["REDIS_URL"]["valueFrom"]
    assert "RANKSERVE_EVENT_SHARDS" in settings_env(objects)

    # what each process makes of it
    for key in list(os.environ):
        if key.startswith(("RANKSERVE_", "REDIS_")):
            monkeypatch.delenv(key)
    for key, value in resolved_env(overlay, server).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    store = FeatureStoreConfig.from_env(resolved_env(overlay, c))
    assert parsed_args(overlay).shards == settings.event_shards
    assert store.resolved_mode() == settings.feature_store.resolved_mode()
    assert store.resolved_mode() == ("single" if overlay == "trial" else "cluster")
    assert store.cluster_nodes == settings.feature_store.cluster_nodes


def test_probes_point_at_the_metrics_port(overlay: str) -> None:
    c = consumer_container(overlay)
    metrics_port = ports(c)["metrics"]
    assert parsed_args(overlay).metrics_port == metrics_port
    for probe in ("startupProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == "metrics" and get["path"] == "/metrics", (probe, get)
        assert c[probe]["timeoutSeconds"] >= 2
    if "readinessProbe" in c:
        assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30  # imports and the port bind
    annotations = consumer(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port and annotations["prometheus.io/path"] == "/metrics"


def test_the_metrics_server_answers_the_probe_path() -> None:
    """What `rankserve consume --metrics-port` starts (prometheus_client's server) answers the
    probes' path with the consumer's metrics."""
    from prometheus_client import start_http_server

    from ingest.stream import ConsumerMetrics

    c = consumer_container("cpu")
    path = c["livenessProbe"]["httpGet"]["path"]
    metrics = ConsumerMetrics()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}{path}", timeout=5) as response:
            assert response.status == 200
            assert b"rankserve_consumer_shards_owned" in response.read()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_pod_security_matches_the_server(overlay: str) -> None:
    objects = render(overlay)
    server_pod = find(objects, "Deployment", "rankserve")["spec"]["template"]["spec"]
    pod = consumer(overlay)["spec"]["template"]["spec"]
    assert pod["securityContext"] == server_pod["securityContext"]
    assert pod["serviceAccountName"] == server_pod["serviceAccountName"]
    assert pod["automountServiceAccountToken"] is False
    c = consumer_container(overlay)
    assert c["securityContext"] == container(find(objects, "Deployment", "rankserve"))["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # the image's working directory is the only writable path, an emptyDir within the pod's budget
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    size = volumes[tmp["name"]]["emptyDir"]["sizeLimit"]
    assert int(size.removesuffix("Mi")) <= int(c["resources"]["limits"]["ephemeral-storage"].removesuffix("Mi"))


def test_shutdown_fits_the_grace_period(overlay: str) -> None:
    """SIGTERM: the step in flight, then the acknowledgements and the lease release, each Redis
    call bounded by --timeout, within the grace period."""
    args = parsed_args(overlay)
    spec = consumer(overlay)["spec"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert (STEP_CALLS + RELEASE_CALLS) * args.timeout <= grace, (args.timeout, grace)
    assert "lifecycle" not in consumer_container(overlay), "no traffic to drain: SIGTERM at once"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_resources_fit_the_consumers_sizing(overlay: str) -> None:
    """One consumer: ~0.2 CPU at 5,000 events/s, one whole CPU (one thread) at 25,000-40,000
    events/s; ~150 MB plus the resolved-item cache."""
    def cpu(v: str) -> float:
        return int(v.removesuffix("m")) / 1000 if v.endswith("m") else float(v)

    def mib(v: str) -> int:
        return int(v.removesuffix("Mi")) if v.endswith("Mi") else int(v.removesuffix("Gi")) * 1024

    resources = consumer_container(overlay)["resources"]
    assert cpu(resources["requests"]["cpu"]) >= 0.2
    assert cpu(resources["limits"]["cpu"]) >= 1
    assert mib(resources["requests"]["memory"]) >= 150
    assert mib(resources["limits"]["memory"]) >= 350  # 150 MB + up to ~200 MB of item cache


def test_replicas_pdb_service_and_policy(overlay: str) -> None:
    objects = render(overlay)
    deployment = consumer(overlay)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == CONSUMER_LABELS
    assert CONSUMER_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] == 2, "two for failover; replicas beyond the shard count sit idle"
    assert deployment["spec"]["replicas"] <= int(settings_env(objects)["RANKSERVE_EVENT_SHARDS"])
    # nothing of the server's selects the consumer pods (its Services would send them traffic)
    for kind, name in (("Service", "rankserve"), ("Service", "rankserve-headless")):
        assert not find(objects, kind, name)["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = find(objects, kind, "rankserve")["spec"].get("selector") or \
            find(objects, kind, "rankserve")["spec"]["podSelector"]
        assert not selector["matchLabels"].items() <= pod_labels.items()

    pdb = find(objects, "PodDisruptionBudget", "rankserve-consumer")
    assert pdb["spec"]["selector"]["matchLabels"] == CONSUMER_LABELS and pdb["spec"]["maxUnavailable"] == 1
    service = find(objects, "Service", "rankserve-consumer")
    assert service["spec"]["selector"] == CONSUMER_LABELS
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    (port,) = service["spec"]["ports"]
    assert port["name"] == port["targetPort"] == "metrics"
    assert port["port"] == ports(consumer_container(overlay))["metrics"]

    policy = find(objects, "NetworkPolicy", "rankserve-consumer")
    assert policy["spec"]["podSelector"]["matchLabels"] == CONSUMER_LABELS
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"metrics"}
    assert policy["spec"]["egress"] == find(objects, "NetworkPolicy", "rankserve")["spec"]["egress"]  # DNS, Redis


def test_the_consume_command_imports_no_training_dependency() -> None:
    """The serving image has no torch and no pandas: `rankserve consume` must not need them."""
    code = (
        "import sys\n"
        "from service.cli import build_parser\n"
        "build_parser('consume')\n"
        "import ingest.stream\n"
        "heavy = {'torch', 'pandas', 'pyarrow'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_deploy_doc_covers_the_consumer() -> None:
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    for needle in ("rankserve consume", "deployment/rankserve-consumer", "rankserve_consumer_lag",
                   "RANKSERVE_EVENT_SHARDS", "RANKSERVE_EVENTS_TOKEN", "terminationGracePeriodSeconds"):
        assert needle in doc, needle
