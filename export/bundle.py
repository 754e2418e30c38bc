"""The model bundle: format constants and the torch-free reader the service uses.

A bundle is one immutable directory, `<root>/<name>/<version>/`:

    manifest.json          name, version, created, schema (hash, spec, vocab sizes), tasks,
                           default fusion, retrieval settings, model config, scorer inputs and
                           outputs, tables, parity results, sha256 of every other file
    scorer.onnx            the dense scorer (ONNX)
    scorer.torchscript.pt  the same scorer (TorchScript)
    tables/*.npy           item/category keys and queries (TWIN-precomputed), representation
                           tables, GSU bias tables; memory-mapped so worker processes share pages
    schema/                the FeatureSchema (schema.json + vocabulary .npy files; schema.json holds
                           the fitted side features, so the schema hash covers them)
    spec.yaml              the feature spec the run was trained from (when the run recorded one)

Opening a bundle verifies every file's sha256 *before* any of it is used, and the manifest is
plain JSON: nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.errors import UserError
from feature_store.schema import FeatureSchema, SchemaError

# /2: action and time gap folded into the behaviour rows (scorer inputs without ret_action & co.)
# /3: the target attention's pooling before the scorer (inputs long_pooled & co., not ret_key & co.)
FORMAT = "rankserve.bundle/3"
MANIFEST = "manifest.json"
ONNX_FILE = "scorer.onnx"
TORCHSCRIPT_FILE = "scorer.torchscript.pt"
SCORER_RUNTIMES = ("onnx", "torchscript")
TABLES_DIR = "tables"
SCHEMA_DIR = "schema"
SPEC_FILE = "spec.yaml"
TABLE_NAMES: tuple[str, ...] = (
    "item_key",
    "category_key",
    "item_query",
    "category_query",
    "item_repr",
    "category_repr",
    "user_repr",
    "gsu_action_bias",
    "gsu_gap_bias",
    "event_key_bias",  # [n_actions * n_gaps, H] by event code action * n_gaps + gap
    "event_repr",  # [n_actions * n_gaps, R]
)


class BundleError(UserError):
    """A bundle that cannot be used: missing or tampered files, bad manifest, wrong schema."""


class BundleExistsError(BundleError, FileExistsError):
    """An export to a bundle version that exists already (bundles are immutable)."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Bundle:
    """An opened, verified bundle. Tables are read-only memory maps."""

    path: Path
    manifest: dict[str, Any]
    schema: FeatureSchema
    tables: dict[str, npt.NDArray[np.float32]]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def retrieval(self) -> dict[str, Any]:
        return dict(self.manifest["retrieval"])

    @property
    def fusion(self) -> dict[str, Any]:
        return dict(self.manifest["fusion"])

    @property
    def scorer_inputs(self) -> tuple[str, ...]:
        """The scorer's inputs, in order: the schema's base inputs, then its side inputs if any."""
        return self.schema.spec.scorer_inputs

    @property
    def spec_path(self) -> Path | None:
        """The feature spec the bundle was trained from (`spec.yaml`), if the bundle has one."""
        rel = self.manifest.get("feature_spec")
        return self.path / str(rel) if rel else None

    @property
    def scorer_runtime(self) -> str:
        """The runtime this bundle asks to be scored with (bundles before the field: "onnx")."""
        return str(self.manifest.get("scorer", {}).get("runtime", "onnx"))

    @property
    def scorer_quantization(self) -> str | None:
        """How the ONNX scorer was quantized ("int8"), None for a float32 one (the TorchScript scorer always is)."""
        value = self.manifest.get("scorer", {}).get("quantization")
        return None if value is None else str(value)

    def scorer_path(self, runtime: str) -> Path:
        """Path of the scorer for `runtime` ("onnx" or "torchscript")."""
        files = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
        if runtime not in files:
            raise BundleError(f"unknown scorer runtime {runtime!r}; expected one of {sorted(files)}")
        return self.path / files[runtime]

    def describe(self) -> dict[str, Any]:
        """A short summary for logs and the /v1/models endpoint."""
        return {
            "name": self.name,
            "version": self.version,
            "created": self.manifest.get("created"),
            "schema_hash": self.schema.hash,
            "tasks": self.tasks,
            "actions": list(self.schema.spec.actions),
            "id_types": dict(zip(("user", "item"), self.schema.spec.id_types, strict=True)),
            "features": {
                group: {"categorical": [e.name for e in g.categorical], "numeric": [e.name for e in g.numeric]}
                for group, g in zip(("user", "item", "context"), self.schema.spec.side.groups(), strict=True)
            },
            "fusion": self.fusion,
            "retrieval": self.retrieval,
            "scorer_runtime": self.scorer_runtime,
            "scorer_quantization": self.scorer_quantization,
        }


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle, or still being written)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable {MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(
            f"{path}: manifest format is {found!r}, this service reads {FORMAT!r}: re-export the run with "
            "this version's `rankserve export`"
        )
    for key in ("name", "version", "schema", "tasks", "fusion", "retrieval", "files", "tables"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest lacks {key!r}")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256, and that nothing escapes the bundle."""
    root = path.resolve()
    for rel, expected in manifest["files"].items():
        file = (path / rel).resolve()
        if root not in file.parents:
            raise BundleError(f"{path}: manifest file {rel!r} points outside the bundle")
        if not file.is_file():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 mismatch for {rel} (manifest {expected[:12]}..., file {actual[:12]}...): "
                "the bundle was modified or corrupted after export"
            )


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory; with `verify`, refuse it unless every file matches its hash and
    every table value is finite (both read every table: callers that want the schema or the
    tables of a bundle checked elsewhere pass False)."""
    p = Path(path)
    manifest = read_manifest(p)
    if verify:
        verify_files(p, manifest)
    try:
        schema = FeatureSchema.load(p / SCHEMA_DIR)
    except SchemaError as exc:
        raise BundleError(f"{p}: bad schema: {exc}") from exc
    if schema.hash != manifest["schema"]["hash"]:
        raise BundleError(f"{p}: schema hash {schema.hash[:12]} differs from the manifest's")
    tables: dict[str, npt.NDArray[np.float32]] = {}
    for name, meta in manifest["tables"].items():
        try:
            arr = np.load(p / meta["file"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{p}: cannot map table {name}: {exc}") from exc
        if list(arr.shape) != list(meta["shape"]) or str(arr.dtype) != meta["dtype"]:
            raise BundleError(
                f"{p}: table {name} is {arr.dtype}{arr.shape}, manifest says {meta['dtype']}{meta['shape']}"
            )
        bad = first_non_finite_row(arr) if verify else None  # a read of every table, as the hashes are
        if bad is not None:
            # retrieval cannot rank a NaN or infinite key (the exact kernel never collects one), and
            # the scorer would turn one into NaN probabilities: a table like that is a broken export
            raise BundleError(f"{p}: table {name} holds a NaN or infinite value in row {bad}; re-export the model")
        tables[name] = arr
    missing = set(TABLE_NAMES) - set(tables)
    if missing:
        raise BundleError(f"{p}: tables missing from the manifest: {sorted(missing)}")
    return Bundle(path=p, manifest=manifest, schema=schema, tables=tables)


def first_non_finite_row(table: npt.NDArray[np.float32], chunk_rows: int = 1 << 16) -> int | None:
    """The first row of `table` holding a NaN or an infinity, or None; read in chunks (no full-size mask)."""
    for start in range(0, table.shape[0], chunk_rows):
        block = np.asarray(table[start : start + chunk_rows])
        finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def list_versions(root: str | Path, name: str) -> list[int]:
    """Versions present under `root/name/` (directories with integer names), ascending."""
    d = Path(root) / name
    if not d.is_dir():
        return []
    return sorted(int(c.name) for c in d.iterdir() if c.is_dir() and c.name.isdigit())
