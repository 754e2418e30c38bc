"""Rendered Kubernetes manifests (`kubectl kustomize`), shared by the deployment tests."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu", "trial")


def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object of `kubectl kustomize k8s/overlays/<overlay>`."""
    return render_dir(K8S / "overlays" / overlay)


@functools.cache
def render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    """Every object of `kubectl kustomize <path>` (a kustomization directory under k8s/)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} objects of kind {kind} named {name}"
    return matches[0]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def deployment() -> dict[str, Any]:
    """The rankserve Deployment of the cpu overlay."""
    return find(render("cpu"), "Deployment", "rankserve")
