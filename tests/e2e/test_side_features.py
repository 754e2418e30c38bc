"""A feature-spec bundle served end to end over loopback: string ids, user and item side features
from the store, request context, custom tasks.

The bundle's schema has string user and item ids (`u-0007`, `sku-00042`: hashed to the store's
keys), user features (city, age), item features (brand, seller, price) and context features
(device, hour), and four custom tasks with ESMM parents. Its own embedded Valkey holds a version
ingested with the user table and item catalogue (some users and items without a row: they get
the defaults). The served scores are checked against the scorer run in process on inputs built
from the raw table rows, which ties ingestion's encoding, the store's tails, the context and the
service's assembly together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from export.bundle import open_bundle
from export.exporter import write_bundle
from feature_store.codecs import encode_side
from feature_store.embedded import EmbeddedValkey
from feature_store.fusion import Fusion
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
from feature_store.spec import SideFeatures, encode_context, stable_id_hash
from feature_store.store import EmbeddedConfig, FeatureStoreConfig
from ingest.bulk import ingest_log, upsert_items
from models.data.events import EventLog, SideTable
from service.assemble import RetrievalSettings, SideRows, Tables, scorer_inputs
from service.retrieval import make_retriever
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import NOW, Server
from tests.helpers import side_feature_spec, tiny_model

pytestmark = pytest.mark.timeout(300)

N_USERS, N_ITEMS, N_CATS = 30, 120, 8
CITIES = np.array(["paris", "lyon", "nice"], dtype=object)
BRANDS = np.array([f"b{k}" for k in range(6)], dtype=object)
DEVICES = ("ios", "android", "web")


def user_name(u: int) -> str:
    return f"u-{u:04d}"


def item_name(i: int) -> str:
    return f"sku-{i:05d}"


@dataclass(frozen=True)
class SideWorld:
    server: Server
    bundle: Path
    redis_url: str
    users: SideTable  # the user table (rows for the first N_USERS - 5 users only)
    items: SideTable  # the item catalogue (no rows for the last 10 items)
    item_category: dict[int, int]  # raw item id -> raw category id


def side_world_schema(rng: np.random.Generator) -> FeatureSchema:
    spec = side_feature_spec()
    n = 300
    columns = {
        "user": {"city": rng.choice(CITIES, n), "age": rng.normal(35, 10, n)},
        "item": {"brand": rng.choice(BRANDS, n), "seller": rng.choice(["s1", "s2"], n),
                 "price": rng.lognormal(3, 1, n)},
        "context": {"device": rng.choice(DEVICES, n), "hour": rng.integers(0, 24, n).astype(np.float64)},
    }
    side = SideFeatures.fit(spec, columns)
    return FeatureSchema(
        SchemaSpec.from_feature_spec(spec, side, id_types=("string", "string")),
        Vocabulary.build(stable_id_hash(user_name(u) for u in range(N_USERS))),
        Vocabulary.build(stable_id_hash(item_name(i) for i in range(N_ITEMS))),
        Vocabulary.build(np.arange(1, N_CATS + 1)),
    )


@pytest.fixture(scope="module")
def side_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SideWorld]:
    root = tmp_path_factory.mktemp("side")
    rng = np.random.default_rng(7)
    schema = side_world_schema(rng)
    schema.save(root / "schema")
    bundle = write_bundle(tiny_model(schema), root / "schema", {"variant": "twin", "data": "side"}, root / "models",
                          "side")

    user_ids = stable_id_hash(user_name(u) for u in range(N_USERS))
    item_ids = stable_id_hash(item_name(i) for i in range(N_ITEMS))
    item_cats = rng.integers(1, N_CATS + 1, N_ITEMS)
    cols: dict[str, list[np.ndarray]] = {"u": [], "i": [], "c": [], "a": [], "t": []}
    for k in range(N_USERS - 2):  # user 1 (a table row) and the last two (none) have no events
        if k == 1:
            continue
        n = 40 if k == 0 else 3 + k % 9
        pick = rng.integers(0, N_ITEMS - 10, n)
        cols["u"].append(np.full(n, user_ids[k]))
        cols["i"].append(item_ids[pick])
        cols["c"].append(item_cats[pick])
        cols["a"].append(rng.choice(schema.spec.n_actions, n, p=[0.7, 0.15, 0.1, 0.05]))
        cols["t"].append(NOW - rng.integers(60, 30 * 86_400, n))
    events = EventLog.from_unsorted(*(np.concatenate(cols[key]) for key in "uicat"))
    n_u, n_i = N_USERS - 5, N_ITEMS - 10
    users = SideTable(user_ids[:n_u], {"city": rng.choice(CITIES, n_u), "age": rng.normal(35, 10, n_u)})
    items = SideTable(item_ids[:n_i], {"brand": rng.choice(BRANDS, n_i), "seller": rng.choice(["s1", "s2"], n_i),
                                       "price": rng.lognormal(3, 1, n_i)})

    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:

        async def ingest() -> None:
            async with create_store(FeatureStoreConfig(url=valkey.url)) as store:
                await ingest_log(store, events, schema, "side1", activate=True, users=users, items=items,
                                 catalogue=(item_ids, item_cats))

        asyncio.run(ingest())
        # an hour's item cache TTL: an upserted item served anew can only have come through the change log
        server = Server(bundle.parent.parent, valkey.url, root / "server.log",
                        env={"RANKSERVE_FEATURE_STORE__ITEM_CACHE_TTL_S": "3600"}).start()
        try:
            server.wait_ready()
            yield SideWorld(server, bundle, valkey.url, users, items, dict(zip(item_ids.tolist(),
                                                                               item_cats.tolist(), strict=True)))
        finally:
            code = server.stop()
            assert code == 0, server.logs()[-4000:]
            assert "unhandled error" not in server.logs(), server.logs()[-4000:]


def rank(world: SideWorld, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(world.server.base_url + "/v1/rank", json=body, timeout=10.0)


CANDIDATES = [item_name(i) for i in (*range(0, 12), N_ITEMS - 1, N_ITEMS - 2)]  # two items without a table row


def expected_scores(world: SideWorld, user: str, candidates: list[str], context: dict[str, Any],
                    request_time: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs, fused) of the bundle's scorer on inputs built here from the raw table rows."""
    bundle = open_bundle(world.bundle)
    schema, spec = bundle.schema, bundle.schema.spec
    side = spec.side
    user_key = int(stable_id_hash([user])[0])
    keys = stable_id_hash(candidates)

    async def fetch() -> Any:
        async with create_store(FeatureStoreConfig(url=world.redis_url)) as store:
            return await store.fetch(user_key, keys.tolist())

    fetched = asyncio.run(fetch())  # the history and indices only: the side features are rebuilt from the tables
    row = np.flatnonzero(world.users.ids == user_key)
    user_cols = {k: v[row] for k, v in world.users.columns.items()} if row.size else {}
    (user_tail,) = encode_side(*side.user.encode_rows(user_cols, 1)) if row.size else (b"",)
    pos = {k: j for j, k in enumerate(world.items.ids.tolist())}
    found = np.array([int(k) in pos for k in keys])
    picked = [pos[int(k)] for k in keys if int(k) in pos]
    codes, values = side.item.encode_rows({k: v[picked] for k, v in world.items.columns.items()}, len(picked))
    tails = iter(encode_side(codes, values))
    rows = np.zeros((len(candidates), 4 * len(side.item.names)), dtype=np.uint8)
    for j in range(len(candidates)):
        if found[j]:
            rows[j] = np.frombuffer(next(tails), dtype=np.uint8)
    inputs = scorer_inputs(
        Tables.from_dict(bundle.tables), RetrievalSettings.from_manifest(bundle.retrieval, spec.time_gap_buckets),
        make_retriever("exact"), fetched.sequence.before(request_time), fetched.user_index or 0,
        schema.items.lookup(keys), fetched.category_index, request_time, spec=spec,
        side=SideRows(user_tail, rows, found, encode_context(side.context, context)),
    )
    session = ort.InferenceSession(str(bundle.scorer_path("onnx")), providers=["CPUExecutionProvider"])
    probs = session.run(None, {name: inputs[name] for name in spec.scorer_inputs})[0]
    return probs, Fusion.from_declared(bundle.tasks, bundle.fusion)(probs)


@pytest.mark.parametrize("user", [user_name(0), user_name(1), user_name(N_USERS - 3), "u-unknown"])
def test_served_scores_match_the_scorer_on_the_raw_rows(side_world: SideWorld, user: str) -> None:
    """A user with a table row and a history, one with a row and no history, one with a history and no
    row (the defaults), an unknown one: the served scores are the scorer's on the raw rows."""
    context = {"device": "android", "hour": 13}
    body = {"user_id": user, "candidates": CANDIDATES, "top_n": len(CANDIDATES), "context": context,
            "request_time": NOW}
    resp = rank(side_world, body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["model"] == "side/1" and not got["degraded"]
    items = got["items"]
    assert sorted(it["item_id"] for it in items) == sorted(CANDIDATES)  # echoed as sent: strings
    assert all(set(it["scores"]) == {"buy", "like", "view", "cart"} for it in items)
    probs, fused = expected_scores(side_world, user, CANDIDATES, context, NOW)
    index = {c: j for j, c in enumerate(CANDIDATES)}
    for it in items:
        j = index[it["item_id"]]
        assert it["score"] == pytest.approx(float(fused[j]), rel=1e-5, abs=1e-6)
        assert [it["scores"][t] for t in ("buy", "like", "view", "cart")] == pytest.approx(
            probs[j].tolist(), rel=1e-5, abs=1e-6)


def test_context_changes_the_scores_and_missing_names_take_the_defaults(side_world: SideWorld) -> None:
    def scores(context: dict[str, Any] | None) -> dict[str, float]:
        body: dict[str, Any] = {"user_id": user_name(0), "candidates": CANDIDATES, "top_n": len(CANDIDATES),
                                "request_time": NOW}
        if context is not None:
            body["context"] = context
        resp = rank(side_world, body)
        assert resp.status_code == 200, resp.text
        return {it["item_id"]: it["score"] for it in resp.json()["items"]}

    ios, web = scores({"device": "ios", "hour": 9}), scores({"device": "web", "hour": 22})
    assert any(abs(ios[c] - web[c]) > 1e-6 for c in CANDIDATES)
    assert scores(None) == scores({}) == scores({"device": None, "hour": None})


@pytest.mark.parametrize(
    ("context", "fragments"),
    [
        ({"weather": "rain"}, ["context.weather", "unknown context feature", "device", "hour"]),
        ({"hour": True}, ["context.hour", "bool"]),
        ({"hour": "13"}, ["context.hour", "str"]),
        ({"device": {"os": "ios"}}, ["context.device", "dict"]),
        ({"device": "x" * 257}, ["context.device", "longer than 256"]),
        ({"hour": 1e300}, ["context.hour", "out of range"]),
    ],
)
def test_bad_context_is_422_and_invalid_argument(side_world: SideWorld, context: dict[str, Any],
                                                 fragments: list[str]) -> None:
    resp = rank(side_world, {"user_id": user_name(0), "candidates": CANDIDATES[:3], "context": context})
    assert resp.status_code == 422, resp.text
    message = resp.json()["error"]["message"]
    assert all(f in message for f in fragments), message
    with grpc.insecure_channel(side_world.server.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb2_grpc.RankerStub(channel).Rank(
            pb2.RankRequest(user_key=user_name(0), candidate_keys=CANDIDATES[:3], context=context), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragments[0] in (info.value.details() or "")


def test_grpc_keys_and_context_match_rest(side_world: SideWorld) -> None:
    context = {"device": "web", "hour": 7}
    rest = rank(side_world, {"user_id": user_name(3), "candidates": CANDIDATES, "top_n": 5, "context": context,
                             "request_time": NOW}).json()
    with grpc.insecure_channel(side_world.server.grpc_target) as channel:
        reply = pb2_grpc.RankerStub(channel).Rank(
            pb2.RankRequest(user_key=user_name(3), candidate_keys=CANDIDATES, top_n=5, context=context,
                            request_time=NOW), timeout=10)
    assert [it.item_key for it in reply.items] == [it["item_id"] for it in rest["items"]]
    assert [it.score for it in reply.items] == pytest.approx([it["score"] for it in rest["items"]])


def test_integer_ids_of_a_string_id_model_are_their_text(side_world: SideWorld) -> None:
    """42 and "42" are one id to a string-id model; an unknown string is cold start, not an error."""
    a = rank(side_world, {"user_id": 42, "candidates": [7, "7", "sku-00001"], "request_time": NOW})
    assert a.status_code == 200, a.text
    scores = {str(it["item_id"]) + type(it["item_id"]).__name__: it["score"] for it in a.json()["items"]}
    assert scores["7int"] == pytest.approx(scores["7str"])
    bad = rank(side_world, {"user_id": user_name(0), "candidates": ["sku-1", ""]})
    assert bad.status_code == 422 and "candidates[1]" in bad.json()["error"]["message"], bad.text


def test_an_upserted_item_is_served_without_waiting_for_the_cache_ttl(side_world: SideWorld) -> None:
    """The running server drops an upserted item from its item cache when it reads the change log,
    and scores it on the new row; upserting the old row back restores the old scores."""
    target = item_name(3)
    row = int(np.flatnonzero(side_world.items.ids == int(stable_id_hash([target])[0]))[0])
    context = {"device": "web", "hour": 8}
    body = {"user_id": user_name(0), "candidates": CANDIDATES, "top_n": len(CANDIDATES), "context": context,
            "request_time": NOW}

    def served() -> dict[str, float]:
        resp = rank(side_world, body)
        assert resp.status_code == 200, resp.text
        return {it["item_id"]: it["score"] for it in resp.json()["items"]}

    def upsert(items: SideTable) -> None:
        async def run() -> None:
            async with create_store(FeatureStoreConfig(url=side_world.redis_url)) as store:
                await upsert_items(store, open_bundle(side_world.bundle).schema, items)
        asyncio.run(run())

    def served_once_changed(old: dict[str, float]) -> dict[str, float]:
        deadline = time.monotonic() + 60.0  # read 4 times a second; far inside the hour's TTL
        while (now := served())[target] == old[target]:
            assert time.monotonic() < deadline, "the upsert was not served: " + side_world.server.logs()[-2000:]
            time.sleep(0.1)
        return now

    original = served()
    columns = {k: v.copy() for k, v in side_world.items.columns.items()}
    columns["brand"][row], columns["price"][row] = "b5", float(columns["price"][row]) * 20 + 100
    changed_items = SideTable(side_world.items.ids, columns)
    upsert(SideTable(changed_items.ids[row : row + 1], {k: v[row : row + 1] for k, v in columns.items()}))

    changed = served_once_changed(original)
    _, fused = expected_scores(replace(side_world, items=changed_items), user_name(0), CANDIDATES, context, NOW)
    for j, item in enumerate(CANDIDATES):
        assert changed[item] == pytest.approx(float(fused[j]), rel=1e-5, abs=1e-6)
    assert all(changed[item] == original[item] for item in CANDIDATES if item != target)

    upsert(SideTable(side_world.items.ids[row : row + 1],
                     {k: v[row : row + 1] for k, v in side_world.items.columns.items()}))
    restored = served_once_changed(changed)
    assert restored == pytest.approx(original, rel=1e-6)
