"""Security properties checked on the source (SECURITY.md): nothing on the serving path can
unpickle, YAML is only safe-loaded, and the admin token is compared in constant time."""

from __future__ import annotations

import ast
import hmac
from pathlib import Path

import pytest
from pydantic import SecretStr

REPO = Path(__file__).resolve().parents[2]
# what a serving process imports (service/ imports export/ and feature_store/; models/ is
# training code, and ingest.bulk reads its event logs)
SERVING_PACKAGES = ("service", "export", "feature_store")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                      "jsonpickle"}


def _findings(path: Path) -> list[str]:
    """Unpickling (or unsafe deserializing) calls and imports in one file, found on the AST so
    that docstrings and comments saying "never unpickled" do not count and aliases do."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path

    def where(node: ast.AST) -> str:
        return f"{name}:{getattr(node, 'lineno', '?')}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
            found += [f"{where(node)} import {name}" for name in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{where(node)} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if func in ("torch.load", "pd.read_pickle", "pandas.read_pickle") or func.endswith(".read_pickle"):
                found.append(f"{where(node)} {func}(...)")
            pickle_kw = keywords.get("allow_pickle")
            if pickle_kw is not None and not (isinstance(pickle_kw, ast.Constant) and pickle_kw.value is False):
                found.append(f"{where(node)} {func}(..., allow_pickle={ast.unparse(pickle_kw)})")
            if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                loader = keywords.get("Loader")
                if loader is None or "Safe" not in ast.unparse(loader):
                    found.append(f"{where(node)} {func}(...) without a SafeLoader")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    text = ("import pickle\nfrom joblib import load\nimport numpy as np, torch, yaml\nnp.load('x', allow_pickle=True)\n"
            "torch.load('m.pt')\nyaml.load(open('x'))\nnp.load('y', allow_pickle=flag)\n"
            '"""never unpickled: pickle.loads is not called here"""\nnp.load("z", allow_pickle=False)\n')
    bad.write_text(text)
    found = _findings(bad)
    assert len(found) == 6, found


def test_nothing_on_the_serving_path_unpickles() -> None:
    files = [p for pkg in SERVING_PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if "_pb2" not in p.name]
    assert len(files) > 20
    found = [f for path in files for f in _findings(path)]
    assert found == [], "deserialization that can run code, on the serving path:\n" + "\n".join(found)


def test_bundles_are_opened_with_json_and_without_pickle() -> None:
    """The bundle reader: manifest as JSON, tables with allow_pickle=False, hashes before use."""
    source = (REPO / "export" / "bundle.py").read_text()
    assert "json.loads" in source and "allow_pickle=False" in source
    body = source[source.index("def open_bundle"):]
    assert body.index("verify_files(") < body.index("FeatureSchema.load("), "hashes are checked before anything is read"


def test_admin_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings
    from service.transports import auth

    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module service.transports.auth calls through
    enabled = Settings(admin_token=SecretStr("s3cret-token"))
    assert auth.token_matches(enabled, "s3cret-token") is True
    assert auth.token_matches(enabled, "s3cret-tokeN") is False
    assert auth.token_matches(enabled, None) is False
    assert auth.token_matches(enabled, "") is False
    assert len(calls) == 4, "every check goes through hmac.compare_digest"
    for disabled in (Settings(), Settings(admin_token=SecretStr(""))):
        assert auth.admin_secret(disabled) is None
        assert auth.token_matches(disabled, "") is False and auth.token_matches(disabled, None) is False
    assert "s3cret-token" not in repr(enabled) and "s3cret-token" not in str(enabled.model_dump())
