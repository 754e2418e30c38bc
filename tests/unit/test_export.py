"""Bundle export: round trip, three-runtime parity, tamper refusal, and the torch-free serving path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.bundle import MANIFEST, BundleError, BundleExistsError, open_bundle
from export.exporter import bundle_name_of, write_bundle
from export.parity import PARITY_TOLERANCE, parity_batch
from export.verify import verify
from feature_store.codecs import Sequence
from feature_store.schema import (
    SCORER_INPUTS,
    FeatureSchema,
    cross_features,
    history_features,
    time_gap_bucket,
    weekday,
)
from models.model import Batch, RankingModel
from service import assemble
from service.assemble import RetrievalSettings, Tables, scorer_inputs
from tests.helpers import side_feature_spec, side_schema, tiny_model, tiny_schema

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[RankingModel, FeatureSchema, Path]:
    schema = tiny_schema()
    model = tiny_model(schema)
    root = tmp_path_factory.mktemp("bundles")
    schema_dir = root / "schema-src"
    schema.save(schema_dir)
    path = write_bundle(model, schema_dir, {"variant": "twin", "data": "tiny"}, root / "models", "tiny")
    return model, schema, path


def test_bundle_round_trip(exported: tuple[RankingModel, FeatureSchema, Path]) -> None:
    model, schema, path = exported
    assert path.name == "1" and path.parent.name == "tiny"
    bundle = open_bundle(path)
    assert bundle.schema.hash == schema.hash
    assert bundle.tasks == ["click", "cart", "buy"]
    assert bundle.manifest["parity"]["max_abs_diff"] <= 1e-5
    for rt in ("onnx", "torchscript"):
        assert set(bundle.manifest["parity"]["per_task"][rt]) == {"click", "cart", "buy"}
    tables = model.precomputed_tables()
    for name, arr in bundle.tables.items():
        assert isinstance(arr, np.memmap), f"{name} should be memory-mapped"
        np.testing.assert_array_equal(arr, tables[name].numpy())
    assert [i["name"] for i in bundle.manifest["scorer"]["inputs"]] == list(SCORER_INPUTS)
    # the Tmall numbers are the default tasks' declared weights
    assert bundle.fusion == {"weights": {"click": 1.0, "cart": 3.0, "buy": 10.0},
                             "transforms": {"click": "identity", "cart": "identity", "buy": "identity"}}
    assert bundle.spec_path is None and "spec.yaml" not in bundle.manifest["files"]
    assert verify(path)["scorer_inputs"] == list(SCORER_INPUTS)


def test_next_version_and_immutability(exported: tuple[RankingModel, FeatureSchema, Path], tmp_path: Path) -> None:
    model, _schema, path = exported
    root = path.parent.parent
    second = write_bundle(model, path / "schema", {}, root, "tiny")
    assert second.name == "2"
    with pytest.raises(BundleExistsError, match="already exists; bundles are immutable"):  # one line from the CLI
        write_bundle(model, path / "schema", {}, root, "tiny", version=1)


def test_tampered_bundle_is_refused(exported: tuple[RankingModel, FeatureSchema, Path], tmp_path: Path) -> None:
    _model, _schema, path = exported
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    table = copy / "tables" / "item_key.npy"
    os.chmod(table, 0o644)
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 mismatch for tables/item_key.npy"):
        open_bundle(copy)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_table_with_a_non_finite_value_is_refused(
    exported: tuple[RankingModel, FeatureSchema, Path], tmp_path: Path, value: float
) -> None:
    # the hashes match (the manifest is rewritten): only the values tell this table is broken
    _model, _schema, path = exported
    import shutil

    from export.bundle import sha256_file

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    table = copy / "tables" / "item_key.npy"
    os.chmod(table, 0o644)
    keys = np.load(table)
    keys[7, 3] = value
    np.save(table, keys)
    manifest_path = copy / MANIFEST
    os.chmod(manifest_path, 0o644)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["tables/item_key.npy"] = sha256_file(table)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"table item_key holds a NaN or infinite value in row 7"):
        open_bundle(copy)


def test_bundle_with_bad_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="format"):
        open_bundle(tmp_path)
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        open_bundle(tmp_path / "missing")


@pytest.mark.parametrize("heads", ["mmoe", "ple", "resflow"])
def test_parity_for_every_head(heads: str, tmp_path: Path) -> None:
    schema = tiny_schema()
    model = tiny_model(schema, heads=heads)
    schema.save(tmp_path / "s")
    path = write_bundle(model, tmp_path / "s", {}, tmp_path / "m", f"tiny-{heads}")
    parity = json.loads((path / MANIFEST).read_text())["parity"]
    assert parity["max_abs_diff"] <= 1e-5, parity


def test_a_model_whose_scores_are_nan_is_not_exported(tmp_path: Path) -> None:
    """NaN differences compare false with the tolerance: they must fail parity, not pass it."""
    schema = tiny_schema()
    model = tiny_model(schema)
    with torch.no_grad():
        model.scorer.dense_norm.running_var.fill_(float("nan"))  # every probability NaN, in every runtime
    schema.save(tmp_path / "s")
    with pytest.raises(RuntimeError, match=r"export parity failed.*inf"):
        write_bundle(model, tmp_path / "s", {}, tmp_path / "m", "nan")
    assert not (tmp_path / "m" / "nan" / "1").exists()


def test_scorer_graph_is_the_inference_graph(exported: tuple[RankingModel, FeatureSchema, Path]) -> None:
    """Exported without autograd (no OneHot); action and gap folded in, so nothing gathers or scatters per behaviour."""
    import onnx

    _model, _schema, path = exported
    graph = onnx.load(str(path / "scorer.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "OneHot" not in ops and "ScatterElements" not in ops
    tables = {init.name for init in graph.initializer}
    looked_up = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in tables}
    assert looked_up == {"weekday_emb.weight"}, "the weekday row is the only table lookup left in the graph"


def history_batch(
    schema: FeatureSchema, hist: Sequence, user: int, items: np.ndarray, cats: np.ndarray, ts: int
) -> Batch:
    """The training-side batch for one user and several candidates (as models.batching builds it)."""
    n, length = items.shape[0], max(len(hist), 1)
    mask = np.zeros(length, dtype=np.float32)
    mask[length - len(hist) :] = 1

    def right(a: np.ndarray) -> np.ndarray:
        out = np.zeros(length, dtype=np.int64)
        out[length - len(hist) :] = a
        return out

    gap = time_gap_bucket(ts - hist.timestamp, schema.spec.time_gap_buckets)
    rep = lambda a: torch.from_numpy(np.repeat(a[None], n, axis=0))  # noqa: E731
    return Batch(
        user=torch.full((n,), user, dtype=torch.long),
        item=torch.from_numpy(items),
        category=torch.from_numpy(cats),
        cand_cross=torch.from_numpy(cross_features(hist.item, hist.action, hist.timestamp, items, ts)),
        hist_item=rep(right(hist.item)),
        hist_category=rep(right(hist.category)),
        hist_action=rep(right(hist.action)),
        hist_gap=rep(right(gap)),
        hist_mask=rep(mask),
        user_dense=rep(history_features(hist.action)),
        weekday=torch.full((n,), int(weekday(ts)), dtype=torch.long),
    )


@pytest.mark.parametrize("length", [0, 3, 8, 50])
@pytest.mark.parametrize("use_retrieval", [True, False])
def test_serving_path_matches_pytorch(length: int, use_retrieval: bool, tmp_path: Path) -> None:
    """numpy gather + retrieval + ONNX Runtime == RankingModel.forward, to 1e-5."""
    schema = tiny_schema()
    model = tiny_model(schema, use_retrieval=use_retrieval)
    schema.save(tmp_path / "s")
    bundle = open_bundle(write_bundle(model, tmp_path / "s", {}, tmp_path / "m", "tiny"))
    rng = np.random.default_rng(length)
    ts = 1_700_000_000
    hist = Sequence(
        item=rng.integers(0, schema.items.size, length),
        category=rng.integers(0, schema.categories.size, length),
        action=rng.integers(0, 4, length),
        timestamp=np.sort(rng.integers(ts - 90 * 86_400, ts, length)),
    )
    items = rng.integers(0, schema.items.size, 20)
    items[0] = 0  # unknown item
    if length:
        items[1:4] = hist.item[-3:]  # revisits: the cross features must match too
    cats = rng.integers(0, schema.categories.size, 20)
    with torch.no_grad():
        expected = model(history_batch(schema, hist, 7, items, cats, ts)).numpy()

    from service.retrieval import make_retriever

    settings = RetrievalSettings.from_manifest(bundle.retrieval, schema.spec.time_gap_buckets)
    inputs = scorer_inputs(Tables.from_dict(bundle.tables), settings, make_retriever("numpy"), hist, 7, items, cats, ts)
    sess = ort.InferenceSession(str(bundle.scorer_path("onnx")), providers=["CPUExecutionProvider"])
    served = sess.run(None, {n: inputs[n] for n in SCORER_INPUTS})[0]
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


def direct_rows(tables: Tables, settings: RetrievalSettings, hist: Sequence, ts: int) -> assemble.HistoryRows:
    """The folded behaviour rows and GSU keys in numpy, gathered per behaviour with no dedup: the reference."""
    item, category = tables.clamp_rows(hist.item, hist.category)
    gap = time_gap_bucket(ts - hist.timestamp, settings.time_gap_buckets)
    event = hist.action * settings.time_gap_buckets + gap
    key = np.concatenate([tables.item_key[item] + tables.category_key[category], tables.event_key_bias[event]], axis=1)
    rep = tables.item_repr[item] + tables.category_repr[category] + tables.event_repr[event]
    a_dim = tables.item_key.shape[1]
    gsu = np.empty((item.shape[0], a_dim + 1), dtype=np.float32)
    gsu[:, :a_dim] = key[:, :a_dim] * np.float32(1.0 / np.sqrt(settings.head_dim))
    gsu[:, a_dim] = tables.gsu_action_bias[hist.action] + tables.gsu_gap_bias[gap]
    identity = np.arange(item.shape[0])
    return assemble.HistoryRows(key, rep, identity, identity, gsu, item, category)


@pytest.mark.parametrize(("length", "distinct_items"), [(2_000, 25), (500, 300), (63, 5), (64, 5), (1, 1), (0, 1)])
def test_history_rows_are_bit_identical_to_direct_gathers(
    exported: tuple[RankingModel, FeatureSchema, Path],
    length: int,
    distinct_items: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building rows once per distinct (item, category, event) changes no bit of any scorer input."""
    _model, schema, path = exported
    bundle = open_bundle(path)
    tables = Tables.from_dict(bundle.tables)
    settings = RetrievalSettings.from_manifest(bundle.retrieval, schema.spec.time_gap_buckets)
    rng = np.random.default_rng(length)
    ts = 1_700_000_000
    pool = rng.choice(schema.items.size, distinct_items, replace=False)
    hist = Sequence(
        item=rng.choice(pool, length),
        category=rng.integers(0, 3, length),  # a revisited item may come with another category
        action=rng.integers(0, 4, length),
        # a few events within the hour (gap bucket 0), so triples repeat
        timestamp=np.sort(np.concatenate([rng.integers(ts - 90 * 86_400, ts, length - length // 4),
                                          rng.integers(ts - 3000, ts, length // 4)])),
    )
    hist.item[:3] = schema.items.size + 5  # past the table: clamped to the OOV row
    hist.category[3:4] = -2
    rows = assemble._history_rows(tables, settings, hist, ts)
    want = direct_rows(tables, settings, hist, ts)
    assert rows.key.dtype == rows.rep.dtype == rows.gsu_keys.dtype == np.float32
    assert rows.key.shape[0] == rows.rep.shape[0] == rows.first.shape[0] <= length == rows.group.shape[0]
    if length >= 500:
        assert rows.first.shape[0] < length, "the case must repeat behaviours"
    for name in ("key", "rep", "gsu_keys"):
        assert np.array_equal(getattr(rows, name)[rows.group], getattr(want, name)), name
    assert np.array_equal(rows.item, want.item) and np.array_equal(rows.category, want.category)
    assert np.array_equal(rows.group[rows.first], np.arange(rows.first.shape[0]))

    from service.retrieval import make_retriever

    cands, cand_cats = rng.integers(0, schema.items.size, 30), rng.integers(0, schema.categories.size, 30)
    args = (tables, settings, make_retriever("exact"), hist, 7, cands, cand_cats, ts)
    served = scorer_inputs(*args)
    monkeypatch.setattr(assemble, "_history_rows", direct_rows)
    direct = scorer_inputs(*args)
    for name in SCORER_INPUTS:
        assert served[name].dtype == direct[name].dtype and np.array_equal(served[name], direct[name]), name


def test_history_with_an_action_past_the_bundle_is_refused(exported: tuple[RankingModel, FeatureSchema, Path]) -> None:
    _model, schema, path = exported
    bundle = open_bundle(path)
    tables = Tables.from_dict(bundle.tables)
    settings = RetrievalSettings.from_manifest(bundle.retrieval, schema.spec.time_gap_buckets)
    hist = Sequence(item=np.array([1, 2]), category=np.array([1, 1]), action=np.array([0, 9]),
                    timestamp=np.array([10, 20]))
    with pytest.raises(IndexError, match="behaviour 1 has action code 9"):
        assemble._history_rows(tables, settings, hist, 30)


def test_the_benchmarks_eager_scorer_is_the_bundles(exported: tuple[RankingModel, FeatureSchema, Path]) -> None:
    """`loadtest.bench.eager_scorer` rebuilds the bundle's scorer from its TorchScript weights."""
    from loadtest.bench import eager_scorer
    from service.retrieval import make_retriever

    _model, schema, path = exported
    bundle = open_bundle(path)
    rng = np.random.default_rng(5)
    ts = 1_700_000_000
    hist = Sequence(item=rng.integers(0, schema.items.size, 40), category=rng.integers(0, 3, 40),
                    action=rng.integers(0, 4, 40), timestamp=np.sort(rng.integers(ts - 86_400, ts, 40)))
    settings = RetrievalSettings.from_manifest(bundle.retrieval, schema.spec.time_gap_buckets)
    inputs = scorer_inputs(Tables.from_dict(bundle.tables), settings, make_retriever("exact"), hist, 7,
                           rng.integers(0, schema.items.size, 12), rng.integers(0, 3, 12), ts)
    with torch.inference_mode():
        eager = eager_scorer(path)(*(torch.from_numpy(inputs[n]) for n in SCORER_INPUTS)).numpy()
    sess = ort.InferenceSession(str(bundle.scorer_path("onnx")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(eager, sess.run(None, {n: inputs[n] for n in SCORER_INPUTS})[0], atol=1e-5, rtol=0)


def test_bundle_reader_does_not_import_torch(exported: tuple[RankingModel, FeatureSchema, Path]) -> None:
    _model, _schema, path = exported
    code = (
        "import sys; from export.bundle import open_bundle; "
        f"b = open_bundle({str(path)!r}); assert 'torch' not in sys.modules, 'torch imported'; print(b.version)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_scorer_runtime_is_chosen_per_bundle(
    exported: tuple[RankingModel, FeatureSchema, Path], tmp_path: Path
) -> None:
    from service.scoring import make_scorer

    model, _schema, path = exported
    assert open_bundle(path).scorer_runtime == "onnx"  # the default
    ts_path = write_bundle(model, path / "schema", {}, tmp_path, "tiny", scorer_runtime="torchscript")
    ts_bundle = open_bundle(ts_path)
    assert ts_bundle.manifest["scorer"]["runtime"] == "torchscript"
    assert make_scorer(ts_bundle, "bundle", 1, "cpu").runtime == "torchscript"
    assert make_scorer(ts_bundle, "onnx", 1, "cpu").runtime == "onnx"  # the setting overrides the bundle
    with pytest.raises(ValueError, match="scorer_runtime must be one of"):
        write_bundle(model, path / "schema", {}, tmp_path, "tiny", scorer_runtime="tensorrt")


@pytest.mark.parametrize(
    ("groups", "kinds"),
    [
        (("user", "item", "context"), ("categorical", "numeric")),
        (("user",), ("numeric",)),
        (("item",), ("categorical",)),
    ],
)
def test_side_feature_bundle(groups: tuple[str, ...], kinds: tuple[str, ...], tmp_path: Path) -> None:
    """Side inputs in both graphs, ONNX == TorchScript == eager to 1e-5, spec.yaml in the bundle, verify-bundle ok."""
    import onnx

    schema = side_schema(groups, kinds)
    spec = schema.spec
    names = list(spec.scorer_inputs)
    model = tiny_model(schema)
    schema.save(tmp_path / "s")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(side_feature_spec(groups, kinds).to_yaml())
    path = write_bundle(model, tmp_path / "s", {"variant": "twin"}, tmp_path / "m", "side", spec_file=spec_file)
    bundle = open_bundle(path)
    manifest = bundle.manifest
    assert manifest["parity"]["max_abs_diff"] <= PARITY_TOLERANCE, manifest["parity"]
    assert [i["name"] for i in manifest["scorer"]["inputs"]] == names == list(bundle.scorer_inputs)
    assert bundle.schema.spec.side.to_dict() == spec.side.to_dict()  # fitted side features, under the hash
    assert manifest["files"]["spec.yaml"] and bundle.spec_path is not None
    assert bundle.spec_path.read_text() == spec_file.read_text()
    assert bundle.fusion == spec.default_fusion()
    assert bundle.fusion["weights"] == {"buy": 10.0, "like": 2.0, "view": 1.0, "cart": 3.0}
    assert bundle.fusion["transforms"]["like"] == "power:0.5"
    summary = verify(path)
    assert summary["ok"] and summary["scorer_inputs"] == names and summary["feature_spec"] == "tiny-side"

    graph = onnx.load(str(path / "scorer.onnx")).graph
    assert [i.name for i in graph.input] == names
    side_inputs = {i.name: i for i in graph.input if i.name.startswith("side_")}
    for inp in side_inputs.values():
        assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    scripted = torch.jit.load(str(path / "scorer.torchscript.pt"))  # type: ignore[no-untyped-call]
    sess = ort.InferenceSession(str(path / "scorer.onnx"), providers=["CPUExecutionProvider"])
    for seed, size in ((11, 33), (12, 4)):
        inputs = parity_batch(model, spec, seed=seed, batch_size=size)
        if "side_ids" in inputs:
            ids = inputs["side_ids"]
            assert int(ids.min()) >= 0 and int(ids.max()) < spec.side.table_rows
        args = [inputs[n] for n in names]
        with torch.no_grad():
            eager = model.scorer(*args).numpy()
            ts = scripted(*args).numpy()
        ox = sess.run(None, {n: inputs[n].numpy() for n in names})[0]
        assert eager.shape == (size, 4)
        np.testing.assert_allclose(ox, eager, atol=PARITY_TOLERANCE, rtol=0)
        np.testing.assert_allclose(ts, eager, atol=PARITY_TOLERANCE, rtol=0)
    with pytest.raises(Exception, match="side_"):  # ONNX Runtime raises its own error type for a missing input
        sess.run(None, {n: inputs[n].numpy() for n in SCORER_INPUTS})


def test_side_table_is_the_only_new_lookup(tmp_path: Path) -> None:
    import onnx

    schema = side_schema()
    schema.save(tmp_path / "s")
    path = write_bundle(tiny_model(schema), tmp_path / "s", {}, tmp_path / "m", "side")
    graph = onnx.load(str(path / "scorer.onnx")).graph
    tables = {init.name for init in graph.initializer}
    looked_up = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in tables}
    assert looked_up == {"weekday_emb.weight", "side_emb.weight"}


def test_bundle_refuses_a_model_of_another_schema(tmp_path: Path) -> None:
    schema = side_schema()
    schema.save(tmp_path / "s")
    with pytest.raises(ValueError, match="scorer inputs"):
        write_bundle(tiny_model(tiny_schema()), tmp_path / "s", {}, tmp_path / "m", "side")


def test_verify_refuses_scorer_inputs_that_differ_from_the_schema(
    exported: tuple[RankingModel, FeatureSchema, Path], tmp_path: Path
) -> None:
    """A bundle whose schema gained side features but whose scorer did not: refused by verify-bundle."""
    import shutil

    _model, _schema, path = exported
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for p in copy.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    side = side_schema()
    base = tiny_schema()
    swapped = FeatureSchema(side.spec, base.users, base.items, base.categories)
    swapped.save(copy / "schema")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema"] = swapped.manifest_entry()
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("schema/")}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="differ from the schema's scorer inputs"):
        verify(copy)


def test_bundle_name_of_a_run() -> None:
    assert bundle_name_of({"feature_spec": {"name": "shop"}, "data": "events:/x.csv"}) == "shop"
    assert bundle_name_of({"data": "synthetic:/data/syn"}) == "synthetic-data-syn"
    assert bundle_name_of({}) == "model"
