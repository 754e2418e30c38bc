"""`rankserve verify-bundle`: check a bundle the way the server will, without torch and without a server.

Verifies the manifest, every file's sha256, the schema and its hash, every table's shape and
dtype, the feature spec (spec.yaml) when the bundle has one, and that ONNX Runtime loads the
scorer with the inputs the service feeds it (the schema's `scorer_inputs`, side inputs included). Prints a JSON
summary per bundle; exits 2 naming the first problem of a bundle that would be refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from export.bundle import ONNX_FILE, Bundle, BundleError, open_bundle
from feature_store.spec import FeatureSpec, SpecError


def check_scorer(bundle: Bundle) -> list[str]:
    """Load the ONNX scorer in ONNX Runtime (CPU) and check its input names; its inputs, in order."""
    import onnxruntime as ort  # the serving runtime; imported here so `--help` stays fast

    try:
        session = ort.InferenceSession(str(bundle.path / ONNX_FILE), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types for a broken graph
        raise BundleError(f"{bundle.path}: ONNX Runtime cannot load {ONNX_FILE}: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    expected = list(bundle.scorer_inputs)
    if names != expected:
        raise BundleError(
            f"{bundle.path}: {ONNX_FILE} inputs {names} differ from the schema's scorer inputs {expected}"
        )
    return names


def check_spec(bundle: Bundle) -> str | None:
    """Parse the bundle's feature spec, if it has one, and check that it names the schema's tasks; its name."""
    path = bundle.spec_path
    if path is None:
        return None
    try:
        spec = FeatureSpec.load(path)
    except SpecError as exc:
        raise BundleError(f"{bundle.path}: bad feature spec: {exc}") from exc
    tasks = [t.name for t in spec.tasks]
    if tasks != bundle.tasks:
        raise BundleError(f"{bundle.path}: spec.yaml declares tasks {tasks}, the bundle predicts {bundle.tasks}")
    return spec.name


def verify(path: Path) -> dict[str, Any]:
    """Everything the server checks at load time except the feature store's schema hash; raises BundleError."""
    bundle = open_bundle(path, verify=True)
    inputs = check_scorer(bundle)
    spec_name = check_spec(bundle)
    return {**bundle.describe(), "path": str(path), "files_verified": len(bundle.manifest["files"]),
            "tables": {name: list(t.shape) for name, t in bundle.tables.items()}, "scorer_inputs": inputs,
            "feature_spec": spec_name, "ok": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE",
                   help="bundle directories, e.g. bundles/tmall/1")


def run(args: argparse.Namespace) -> int:
    for path in args.bundles:
        summary = verify(path)  # BundleError: the CLI prints it as one line and exits 2
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    return 0
