"""Kubernetes manifests: every overlay renders with `kubectl kustomize`, every object validates
against the pinned Kubernetes version's schema (strict: unknown fields are errors), and the
Deployment is what production needs (security context, probes on the real endpoints,
draining, writable paths, secrets only by reference), consistent with the app and the docs."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import pytest

from tests.deploy.conftest import K8S, OVERLAYS, REPO, find, render

pytestmark = pytest.mark.timeout(120)

KUBERNETES_VERSION = "1.30"  # the oldest version these manifests support; bump deliberately
SERVER_LABELS = {"app.kubernetes.io/name": "rankserve", "app.kubernetes.io/component": "server"}


def container(deployment: dict[str, Any], name: str = "rankserve") -> dict[str, Any]:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return dict(c)


def mounts_by_path(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}


def volumes_by_name(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def settings_env(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("rankserve-settings")]
    return dict(cm["data"])


# -- schema validation --------------------------------------------------------------------------------


def test_every_manifest_validates(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    assert len(objects) >= 10
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")


def test_the_validator_is_not_vacuous() -> None:
    """A misspelt field and a wrong type are caught (strict mode), so a pass above means something."""
    import kubernetes_validate

    bad = copy.deepcopy(find(render("cpu"), "Deployment", "rankserve"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(find(render("cpu"), "Deployment", "rankserve"))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_overlays_have_the_expected_objects(overlay: str) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render(overlay))
    expected = {
        ("Deployment", "rankserve"), ("Service", "rankserve"), ("Service", "rankserve-headless"),
        ("HorizontalPodAutoscaler", "rankserve"), ("PodDisruptionBudget", "rankserve"),
        ("NetworkPolicy", "rankserve"), ("PersistentVolumeClaim", "rankserve-bundles"),
        ("ConfigMap", "rankserve-experiments"), ("ServiceAccount", "rankserve"), ("Namespace", "rankserve"),
        # the event consumer (test_k8s_consumer.py)
        ("Deployment", "rankserve-consumer"), ("Service", "rankserve-consumer"),
        ("PodDisruptionBudget", "rankserve-consumer"), ("NetworkPolicy", "rankserve-consumer"),
    }
    if overlay == "trial":
        expected |= {("StatefulSet", "rankserve-redis"), ("Service", "rankserve-redis"),
                     ("NetworkPolicy", "rankserve-redis")}
    names = {(k, n) for k, n in kinds if not n.startswith("rankserve-settings-")}
    assert names == expected
    assert not [o for o in render(overlay) if o["kind"] == "Secret"], "no Secret is committed; the operator makes them"
    namespaced = [o for o in render(overlay) if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"rankserve"}


# -- the Deployment ------------------------------------------------------------------------------------


def test_pod_security(overlay: str) -> None:
    objects = render(overlay)
    pods = [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for pod in pods:
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
            assert sc.get("privileged", False) is False, c["name"]
            assert "limits" in c["resources"] and "memory" in c["resources"]["limits"], c["name"]


def test_probes_hit_the_real_endpoints(deployment: dict[str, Any]) -> None:
    from service.transports.rest.app import router

    paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    c = container(deployment)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in paths, (probe, get)
        assert get["port"] == "http" and port_names["http"] == 8000
    # the startup probe gives a first model load minutes, not seconds
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["livenessProbe"]["timeoutSeconds"] >= 2


def test_draining_fits_the_grace_period(deployment: dict[str, Any]) -> None:
    c = container(deployment)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = float(settings_env(render("cpu"))["RANKSERVE_DRAIN_TIMEOUT_S"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop + drain + 5 <= grace, (pre_stop, drain, grace)  # + closing the store
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_volumes(deployment: dict[str, Any]) -> None:
    mounts, volumes = mounts_by_path(deployment), volumes_by_name(deployment)
    env = settings_env(render("cpu"))
    # every path the server writes is an emptyDir (the root filesystem is read-only)
    for path in ("/tmp", "/var/cache/numba", env["RANKSERVE_SHADOW_SINK_DIR"]):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    limit = container(deployment)["resources"]["limits"]["ephemeral-storage"]
    size_mi = sum(int(v["emptyDir"]["sizeLimit"].removesuffix("Mi")) for v in volumes.values() if "emptyDir" in v)
    assert size_mi <= int(limit.removesuffix("Gi")) * 1024, "the emptyDirs count against ephemeral-storage"
    bundles = mounts["/models"]
    assert bundles["readOnly"] is True and env["RANKSERVE_MODEL_DIR"] == "/models"
    claim = volumes[bundles["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True and claim["claimName"] == "rankserve-bundles"
    # experiments: a directory mount of a ConfigMap without a hash suffix (no subPath: the kubelet
    # then updates the file in place and the service reloads it without a restart)
    experiments = mounts["/etc/rankserve/experiments"]
    assert "subPath" not in experiments
    assert volumes[experiments["name"]]["configMap"]["name"] == "rankserve-experiments"


def test_experiments_are_off_by_default_and_the_example_is_valid() -> None:
    """An experiments file that does not validate keeps pods not ready, so the base ships only a
    commented example and leaves RANKSERVE_EXPERIMENTS_FILE unset; the commented setting points
    into the mount, and the example passes the service's own parser."""
    from service.experiments.manager import parse_experiments

    env_text = (K8S / "base" / "settings.env").read_text()
    assert "RANKSERVE_EXPERIMENTS_FILE" not in settings_env(render("cpu"))
    (setting,) = re.findall(r"^# RANKSERVE_EXPERIMENTS_FILE=(\S+)$", env_text, re.M)
    assert os.path.dirname(setting) == "/etc/rankserve/experiments"
    cm = find(render("cpu"), "ConfigMap", "rankserve-experiments")
    (name,) = cm["data"]
    assert name == os.path.basename(setting)
    text = cm["data"][name]
    example = text[text.index("# Example:") :].splitlines()[1:]
    spec = parse_experiments("\n".join(line.removeprefix("# ") for line in example))
    assert sum(arm.share for arm in spec.arms) == 100


def test_secrets_only_by_reference(overlay: str) -> None:
    deployment = find(render(overlay), "Deployment", "rankserve")
    env = {e["name"]: e for e in container(deployment)["env"]}
    redis = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert (redis["name"], redis["key"]) == ("rankserve-redis", "url")
    admin = env["RANKSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (admin["name"], admin["key"], admin["optional"]) == ("rankserve-admin", "token", True)
    events = env["RANKSERVE_EVENTS_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (events["name"], events["key"], events["optional"]) == ("rankserve-events", "token", True)
    settings = settings_env(render(overlay))
    for key, value in settings.items():
        assert not re.search(r"(TOKEN|PASSWORD|SECRET)", key), key
        assert "@" not in value, f"{key} looks like a URL with credentials"
    # a URL with a password anywhere under k8s/ (placeholders like PASSWORD or $VAR in comments are fine)
    for path in (p for p in K8S.rglob("*") if p.is_file()):
        found = re.search(r"rediss?://[^\s\"'/]*:(?![A-Z_]+@|\$)[^\s\"'@]+@", path.read_text())
        assert not found, f"{path}: {found.group(0) if found else ''}"


def test_thread_pools_follow_the_cpu_limit(overlay: str) -> None:
    c = container(find(render(overlay), "Deployment", "rankserve"))
    env = {e["name"]: e for e in c["env"]}
    for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        ref = env[name]["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and ref["containerName"] == "rankserve"
    assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]


def test_serving_environment_is_tuned(overlay: str) -> None:
    """No spinning OpenMP pools and one ONNX Runtime thread per worker (docs/PERFORMANCE.md)."""
    env = settings_env(render(overlay))
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["RANKSERVE_SCORER_THREADS"] == "1"


def test_settings_configmap_is_valid_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap, as the pod's environment, builds a valid `Settings` with the intended values."""
    from service.settings import Settings

    for key in list(os.environ):
        if key.startswith(("RANKSERVE_", "REDIS_")):
            monkeypatch.delenv(key)
    env = settings_env(render(overlay))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REDIS_URL", "rediss://:example@redis.example:6379/0")  # what the Secret provides
    settings = Settings()
    deployment = find(render(overlay), "Deployment", "rankserve")
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert settings.host == "0.0.0.0"
    assert (settings.http_port, settings.grpc_port) == (ports["http"], ports["grpc"])
    assert str(settings.model_dir) == "/models"
    assert settings.scorer_threads == 1
    mode = settings.feature_store.resolved_mode()
    assert mode == ("single" if overlay == "trial" else "cluster"), mode
    if overlay == "gpu":
        assert settings.execution_provider == "cuda"


def test_services_pdb_hpa_policy_select_the_server_pods(overlay: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", "rankserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert SERVER_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    port_names = {p["name"] for p in container(deployment)["ports"]}
    for name in ("rankserve", "rankserve-headless"):
        service = find(objects, "Service", name)
        assert service["spec"]["selector"] == SERVER_LABELS
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {p["name"] for p in find(objects, "Service", "rankserve")["spec"]["ports"]} == {"http", "grpc"}
    assert find(objects, "PodDisruptionBudget", "rankserve")["spec"]["selector"]["matchLabels"] == SERVER_LABELS
    hpa = find(objects, "HorizontalPodAutoscaler", "rankserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rankserve"}
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, a drain keeps one pod serving
    policy = find(objects, "NetworkPolicy", "rankserve")
    assert policy["spec"]["podSelector"]["matchLabels"] == SERVER_LABELS
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"http", "grpc"}


def test_gpu_overlay_requests_a_gpu() -> None:
    c = container(find(render("gpu"), "Deployment", "rankserve"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"].endswith("-gpu")
    assert container(find(render("cpu"), "Deployment", "rankserve"))["image"].endswith("-cpu")


def test_trial_redis_is_private_and_password_protected() -> None:
    objects = render("trial")
    redis = find(objects, "StatefulSet", "rankserve-redis")
    c = redis["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(c["command"])
    assert "requirepass" in script and "$REDIS_PASSWORD" in script
    assert "--requirepass" not in script, "the password must not be on the command line"
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rankserve-redis", "key": "password"}
    policy = find(objects, "NetworkPolicy", "rankserve-redis")
    (rule,) = policy["spec"]["ingress"]
    consumer = {**SERVER_LABELS, "app.kubernetes.io/component": "consumer"}
    assert rule["from"] == [{"podSelector": {"matchLabels": SERVER_LABELS}},
                            {"podSelector": {"matchLabels": consumer}}]
    assert "Egress" in policy["spec"]["policyTypes"] and not policy["spec"].get("egress")
    assert settings_env(objects)["REDIS_CLUSTER_NODES"] == ""


def secret_refs(node: Any) -> list[dict[str, Any]]:
    """Every secretKeyRef anywhere inside a manifest."""
    if isinstance(node, dict):
        own = [node["secretKeyRef"]] if isinstance(node.get("secretKeyRef"), dict) else []
        return own + [ref for value in node.values() for ref in secret_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in secret_refs(value)]
    return []


# -- the docs match the manifests ------------------------------------------------------------------------


def test_deploy_doc_matches_the_manifests() -> None:
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    assert "kubectl apply -k k8s/overlays/cpu" in doc
    for path in set(re.findall(r"k8s/[\w./-]+[\w-]", doc)):
        assert (REPO / path).exists(), f"docs/DEPLOY.md names {path}, which does not exist"
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in doc
    # every Secret the manifests reference is created in the doc, with the same keys
    refs = {(ref["name"], ref["key"]) for overlay in OVERLAYS for obj in render(overlay) for ref in secret_refs(obj)}
    assert refs == {("rankserve-redis", "url"), ("rankserve-redis", "password"), ("rankserve-admin", "token"),
                    ("rankserve-events", "token")}
    for secret, key in refs:
        command = rf"create secret generic {secret}\b[^\n]*(\\\n[^\n]*)*--from-literal={key}="
        assert re.search(command, doc), f"docs/DEPLOY.md never creates key {key} of Secret {secret}"
    # the objects the doc tells an operator to edit or watch exist
    doc_objects = {("Deployment", "rankserve"): "deployment/rankserve",
                   ("Deployment", "rankserve-consumer"): "deployment/rankserve-consumer",
                   ("ConfigMap", "rankserve-experiments"): "configmap rankserve-experiments"}
    for (kind, name), mention in doc_objects.items():
        assert mention in doc, mention
        find(render("cpu"), kind, name)
    for env_name in re.findall(r"\b(RANKSERVE_[A-Z_]+)\b", doc):
        from service.settings import Settings

        field = env_name.removeprefix("RANKSERVE_").split("__")[0].lower()
        assert field in Settings.model_fields or field == "config", f"docs/DEPLOY.md: unknown setting {env_name}"
