"""Monitoring manifests (k8s/components/monitoring): the alert rules pass `promtool check rules`
and their promtool unit tests, the PrometheusRule holds exactly the plain rules file, the
component renders on an overlay with ServiceMonitors that match the server's and the event
consumer's Services, and the rules and the Grafana dashboard only use metrics the server and the
consumer export. tests/e2e/test_prometheus.py runs every expression against a real Prometheus
scraping a real server."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import K8S, REPO, find

pytestmark = pytest.mark.timeout(120)

MONITORING = K8S / "components" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES_TEST = REPO / "tests" / "deploy" / "promtool" / "rules_test.yaml"
ALERTS = {"RankserveHighP99Latency", "RankserveHighDegradedShare", "RankserveNoModelLoaded", "RankserveBundleRefused",
          "RankserveFeatureSetTooOld", "RankserveItemChangeLogUnread", "RankserveConsumerLagGrowing",
          "RankserveConsumerBatchesFailing", "RankserveConsumerDeadLetters"}
PANELS = {"Request rate", "Latency p50 per stage", "Latency p99 per stage", "Degraded share", "Arm shares",
          "Shadow agreement", "Errors by code"}


def tool(name: str) -> str:
    """Path of a Prometheus binary; fails (never skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make prometheus` (Debian's prometheus package; make test does it)")
    return path


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard_exprs() -> dict[str, list[str]]:
    doc = json.loads(DASHBOARD.read_text())
    return {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in doc["panels"]}


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name a fresh `Metrics` (the server) or `ConsumerMetrics` (`rankserve consume`)
    exports (histogram parts included), this process being single-process (the label sets are
    created on use, so a few samples are made here first)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ingest.stream import ConsumerMetrics
    from service.observability.metrics import Metrics

    m = Metrics()
    m.stage_seconds.labels("fetch").observe(0.01)
    m.request_seconds.labels("default").observe(0.01)
    m.requests.labels("rest", "ok").inc()
    m.degraded.labels("timeout").inc()
    m.arm_requests.labels("default", "ok").inc()
    m.arm_share.labels("default", "tiny/1").set(100)
    m.shadow_agreement.labels("default", "s", "kendall_tau").observe(0.9)
    m.shadow_jobs.labels("default", "s", "ok").inc()
    m.item_cache.labels("hit").inc()
    m.model_info.labels("tiny", "1").set(1)
    c = ConsumerMetrics()
    for outcome in ("appended", "duplicate", "dead_letter"):
        c.events.labels(outcome).inc()
    c.lag.labels("rs:ev:{s0}").set(0)
    c.pending.labels("rs:ev:{s0}").set(0)
    texts = (m.exposition().decode(), generate_latest(c.registry).decode())
    return frozenset(s.name for text in texts for f in text_string_to_metric_families(text) for s in f.samples)


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout, check.stdout
    unit = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout, unit.stdout
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == ALERTS == set(rule_exprs())  # every alert is shown to fire in a unit test


def test_prometheusrule_holds_the_rules_file() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in {"warning", "critical"}, r
            assert r["annotations"]["summary"] and r["annotations"]["description"], r


def test_rules_and_dashboard_use_exported_metrics() -> None:
    exprs = [*rule_exprs().values(), *(e for panel in dashboard_exprs().values() for e in panel)]
    used = {name for expr in exprs for name in re.findall(r"\brankserve_[a-z_]+", expr)}
    assert used, exprs
    missing = used - exported_metric_names()
    assert not missing, f"referenced but not exported: {sorted(missing)}"


def test_dashboard_has_the_panels_operators_need() -> None:
    doc = json.loads(DASHBOARD.read_text())
    panels = dashboard_exprs()
    assert set(panels) >= PANELS
    assert all(exprs for exprs in panels.values())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all('namespace=~"$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_component_renders_on_an_overlay(tmp_path: Path) -> None:
    """An overlay that adds the component: the CRs come out in the namespace, the ServiceMonitor
    selects the Service and its port, and the dashboard ConfigMap is labelled for Grafana."""
    import kubernetes_validate

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is not installed")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize wants relative paths to the other kustomizations
    rel = Path("../" * len(overlay.parts[1:])) / K8S.relative_to("/")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "rankserve",
        "resources": [str(rel / "overlays" / "cpu")], "components": [str(rel / "components" / "monitoring")],
    }))
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects: tuple[dict[str, Any], ...] = tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)

    monitor = find(objects, "ServiceMonitor", "rankserve")
    rule = find(objects, "PrometheusRule", "rankserve")
    for cr in (monitor, rule):
        assert cr["apiVersion"] == "monitoring.coreos.com/v1" and cr["metadata"]["namespace"] == "rankserve"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    service = find(objects, "Service", "rankserve")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    headless = find(objects, "Service", "rankserve-headless")
    assert endpoint["port"] not in {p["name"] for p in headless["spec"]["ports"]}  # each pod scraped once
    # the event consumers: their own ServiceMonitor, on the consumer Service's metrics port, which
    # is the port the consumer serves its metrics on; the server's ServiceMonitor does not select it
    consumer_monitor = find(objects, "ServiceMonitor", "rankserve-consumer")
    assert consumer_monitor["metadata"]["namespace"] == "rankserve"
    consumer_service = find(objects, "Service", "rankserve-consumer")
    assert not selector.items() <= consumer_service["metadata"]["labels"].items()
    consumer_selector = consumer_monitor["spec"]["selector"]["matchLabels"]
    assert consumer_selector.items() <= consumer_service["metadata"]["labels"].items()
    assert not consumer_selector.items() <= service["metadata"]["labels"].items()
    (consumer_endpoint,) = consumer_monitor["spec"]["endpoints"]
    assert consumer_endpoint["path"] == "/metrics"
    (port,) = [p for p in consumer_service["spec"]["ports"] if p["name"] == consumer_endpoint["port"]]
    deployment = find(objects, "Deployment", "rankserve-consumer")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert consumer_service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    dashboard = find(objects, "ConfigMap", "rankserve-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["grafana-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    # everything else is plain Kubernetes: the strict schema check of test_k8s.py
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(obj, "1.30", strict=True)
