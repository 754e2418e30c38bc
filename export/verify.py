"""`rankserve verify-bundle`: check a bundle the way the server will, without torch and without a server.

Verifies the manifest, every file's sha256, the schema and its hash, every table's shape and
dtype, and that ONNX Runtime loads the scorer with the inputs the service feeds it. Prints a JSON
summary per bundle; exits 2 naming the first problem of a bundle that would be refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from export.bundle import ONNX_FILE, Bundle, BundleError, open_bundle
from feature_store.schema import SCORER_INPUTS


def check_scorer(bundle: Bundle) -> list[str]:
    """Load the ONNX scorer in ONNX Runtime (CPU) and check its input names; its inputs, in order."""
    import onnxruntime as ort  # the serving runtime; imported here so `--help` stays fast

    try:
        session = ort.InferenceSession(str(bundle.path / ONNX_FILE), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types for a broken graph
        raise BundleError(f"{bundle.path}: ONNX Runtime cannot load {ONNX_FILE}: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    if names != list(SCORER_INPUTS):
        raise BundleError(f"{bundle.path}: {ONNX_FILE} inputs {names} differ from the service's {list(SCORER_INPUTS)}")
    return names


def verify(path: Path) -> dict[str, Any]:
    """Everything the server checks at load time except the feature store's schema hash; raises BundleError."""
    bundle = open_bundle(path, verify=True)
    check_scorer(bundle)
    return {**bundle.describe(), "path": str(path), "files_verified": len(bundle.manifest["files"]),
            "tables": {name: list(t.shape) for name, t in bundle.tables.items()}, "ok": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE",
                   help="bundle directories, e.g. bundles/tmall/1")


def run(args: argparse.Namespace) -> int:
    for path in args.bundles:
        summary = verify(path)  # BundleError: the CLI prints it as one line and exits 2
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    return 0
