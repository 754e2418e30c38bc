"""A team's own data through every command, with only `--spec` at train time.

The data (tests/shop_data.py) is a generic CSV with string ids, custom action names
(view, like, purchase), an impression action, an item catalogue with side features (including
items nobody touched), a user table (some users without a row) and context columns on every
event. The commands run as a user runs them, one process each:

    rankserve train --spec shop.yaml --out RUN
    rankserve evaluate --run RUN
    rankserve export --run RUN --out MODELS
    rankserve ingest --bundle MODELS/shop/1 --data-root DIR --activate
    rankserve serve --model-dir MODELS

Then held-out ranking queries of the offline evaluator (a user at a time: the samples it scores
there, with the context of that moment) go to the service over REST and gRPC with string ids and
the context object: the responses name the spec's tasks and carry the offline model's task
probabilities to 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2

from feature_store.embedded import EmbeddedValkey
from feature_store.spec import stable_id_hash
from feature_store.store import EmbeddedConfig
from models.batching import Collator
from models.checkpoint import load_run
from models.data.readers import dataset_of_run
from models.train import SPLIT_TEST, predict, samples_for_run
from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import REPO, Server
from tests.shop_data import context_of, item_name, user_name, write_shop

pytestmark = pytest.mark.timeout(900)

QUERIES = 30
TOLERANCE = 1e-5
TASKS = ("engage", "buy")  # the spec's tasks, in its order
SMALL = ["--epochs", "1", "--no-progress", "--batch-size", "128", "--retrieval-k", "8", "--attn-dim", "8",
         "--repr-dim", "16", "--side-dim", "4", "--threads", "1"]


def rankserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@dataclass(frozen=True)
class Query:
    user: str
    ts: int
    items: list[str]
    offline: np.ndarray  # [len(items), tasks] the offline model's probabilities


@dataclass(frozen=True)
class Pipeline:
    run: Path
    bundle: Path
    server: Server
    queries: list[Query]
    evaluate_stdout: str


def offline_queries(run: Path, users: int, items: int) -> list[Query]:
    """The evaluator's test-split ranking queries (one user at one timestamp) with its probabilities."""
    model, _, config = load_run(run)
    samples = samples_for_run(config, dataset_of_run(config))
    spec = samples.schema.spec
    assert spec.task_names == TASKS
    user_of = dict(zip(stable_id_hash(user_name(u) for u in range(users)).tolist(),
                       (user_name(u) for u in range(users)), strict=True))
    item_of = dict(zip(stable_id_hash(item_name(i) for i in range(items)).tolist(),
                       (item_name(i) for i in range(items)), strict=True))
    test = np.flatnonzero(samples.split == SPLIT_TEST).astype(np.int64)
    probs = predict(model, Collator(samples, spec, spec.max_sequence_length), test)
    _, user_index = np.unique(samples.raw_user[test], return_inverse=True)
    key = user_index.astype(np.int64) * (1 << 40) + samples.ts[test]  # one key per (user, timestamp)
    queries = []
    keys, counts = np.unique(key, return_counts=True)
    pages = keys[counts >= 4]  # pages of impressions (with any engagement at that moment)
    _, first = np.unique(pages >> 40, return_index=True)
    # two pages per user, and a few single-event moments (a view or a like)
    chosen = np.concatenate([pages[first], pages[np.minimum(first + 1, len(pages) - 1)], keys[counts == 1][:3]])
    for k in np.unique(chosen)[:QUERIES]:
        rows = np.flatnonzero(key == k)
        s = test[rows]
        queries.append(Query(user_of[int(samples.raw_user[s[0]])], int(samples.ts[s[0]]),
                             [item_of[int(i)] for i in samples.raw_item[s]], probs[rows]))
    return queries


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("spec-pipeline")
    spec = write_shop(root / "shop")
    run, models = root / "run", root / "models"
    ok(rankserve("train", "--spec", str(spec), "--out", str(run), *SMALL))
    evaluate_stdout = ok(rankserve("evaluate", "--run", str(run)))
    ok(rankserve("export", "--run", str(run), "--out", str(models)))
    bundle = models / "shop" / "1"
    queries = offline_queries(run, users=60, items=320)
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        ok(rankserve("ingest", "--bundle", str(bundle), "--data-root", str(spec.parent), "--redis-url", valkey.url,
                     "--version", "shop1", "--activate", "--no-progress"))
        server = Server(models, valkey.url, root / "server.log", {"RANKSERVE_MAX_TOP_N": "1000"}).start()
        try:
            server.wait_ready()
            yield Pipeline(run, bundle, server, queries, evaluate_stdout)
        finally:
            code = server.stop()
            assert code == 0, server.logs()[-4000:]
            assert "unhandled error" not in server.logs(), server.logs()[-4000:]


def test_the_run_and_bundle_carry_the_spec(pipeline: Pipeline) -> None:
    assert (pipeline.run / "spec.yaml").read_text() == (pipeline.bundle / "spec.yaml").read_text()
    manifest = json.loads((pipeline.bundle / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= TOLERANCE
    assert "engage AUC" in pipeline.evaluate_stdout and "buy\\|engage AUC" in pipeline.evaluate_stdout
    current = httpx.get(pipeline.server.base_url + "/v1/models", timeout=10).json()["current"]
    assert current["key"] == "shop/1" and current["tasks"] == list(TASKS)
    assert current["id_types"] == {"user": "string", "item": "string"}
    assert current["features"] == {
        "user": {"categorical": ["city"], "numeric": ["age"]},
        "item": {"categorical": ["brand", "seller"], "numeric": ["price"]},
        "context": {"categorical": ["device"], "numeric": ["hour"]},
    }


def test_queries_cover_string_ids_context_and_impressions(pipeline: Pipeline) -> None:
    """The parity queries are not trivial: several users, several candidates, both contexts' devices."""
    assert len(pipeline.queries) == QUERIES
    assert len({q.user for q in pipeline.queries}) >= 5
    assert sum(len(q.items) for q in pipeline.queries) >= 3 * QUERIES
    assert len({str(context_of(q.user, q.ts)["device"]) for q in pipeline.queries}) >= 2


def test_rest_serves_the_offline_probabilities(pipeline: Pipeline) -> None:
    worst = 0.0
    with httpx.Client(base_url=pipeline.server.base_url, timeout=30) as client:
        for q in pipeline.queries:
            body = {"user_id": q.user, "candidates": q.items, "request_time": q.ts, "top_n": len(q.items),
                    "context": context_of(q.user, q.ts)}
            resp = client.post("/v1/rank", json=body)
            assert resp.status_code == 200, resp.text
            got = resp.json()
            assert got["model"] == "shop/1" and not got["degraded"]
            served = {it["item_id"]: it["scores"] for it in got["items"]}
            for item, expected in zip(q.items, q.offline, strict=True):
                assert tuple(served[item]) == TASKS
                diff = np.abs(np.asarray([served[item][t] for t in TASKS]) - expected).max()
                worst = max(worst, float(diff))
    assert worst <= TOLERANCE, f"REST probabilities differ from the offline model by {worst:.2e}"


def test_grpc_serves_the_offline_probabilities(pipeline: Pipeline) -> None:
    worst = 0.0
    with grpc.insecure_channel(pipeline.server.grpc_target) as channel:
        stub = pb2_grpc.RankerStub(channel)
        for q in pipeline.queries:
            context = struct_pb2.Struct()
            json_format.ParseDict(context_of(q.user, q.ts), context)
            reply = stub.Rank(pb2.RankRequest(user_key=q.user, candidate_keys=q.items, request_time=q.ts,
                                              top_n=len(q.items), context=context), timeout=30)
            assert not reply.degraded
            served: dict[str, Any] = {it.item_key: it.scores for it in reply.items}
            for item, expected in zip(q.items, q.offline, strict=True):
                assert set(served[item]) == set(TASKS)
                diff = np.abs(np.asarray([served[item][t] for t in TASKS]) - expected).max()
                worst = max(worst, float(diff))
    assert worst <= TOLERANCE, f"gRPC probabilities differ from the offline model by {worst:.2e}"


def test_the_context_reaches_the_scores(pipeline: Pipeline) -> None:
    """Parity above could hold with the context ignored on both sides: it must move the scores."""
    q = pipeline.queries[0]
    scores = {}
    for device in ("ios", "web"):
        body = {"user_id": q.user, "candidates": q.items, "request_time": q.ts, "top_n": len(q.items),
                "context": {"device": device, "hour": 12}}
        resp = httpx.post(pipeline.server.base_url + "/v1/rank", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        scores[device] = {it["item_id"]: it["score"] for it in resp.json()["items"]}
    assert any(abs(scores["ios"][i] - scores["web"][i]) > 1e-7 for i in q.items)


def test_an_int8_export_of_the_run_and_what_it_costs_in_auc(pipeline: Pipeline, tmp_path: Path) -> None:
    """`export --quantize int8` of the same run, and the eval harness's AUC change on its held-out queries."""
    from export.quantize import QUANTIZED_PARITY_TOLERANCE
    from loadtest.eval_strategies import main as eval_strategies

    out = ok(rankserve("export", "--run", str(pipeline.run), "--out", str(tmp_path / "models"), "--quantize", "int8"))
    manifest = json.loads((Path(out.strip()) / "manifest.json").read_text())
    assert manifest["scorer"]["quantization"] == "int8" and manifest["parity"]["passed"]
    assert max(manifest["parity"]["per_task"]["onnx"].values()) <= QUANTIZED_PARITY_TOLERANCE

    report_file = tmp_path / "report.json"
    assert eval_strategies(["--run", str(pipeline.run), "--strategies", "exact", "--scorers", "torch,onnx,onnx-int8",
                            "--out", str(report_file)]) == 0
    entries = json.loads(report_file.read_text())["strategies"]
    assert set(entries) == {"exact", "exact+onnx", "exact+onnx-int8"}
    float_graph, int8_graph = entries["exact+onnx"], entries["exact+onnx-int8"]
    # the float graph is the model; the int8 one is not, and says by how much per task
    assert float_graph["max_abs_diff_vs_torch"] <= TOLERANCE
    assert all(abs(change) < 1e-6 for change in float_graph["auc_change_vs_torch"].values())
    assert int8_graph["max_abs_diff_vs_torch"] > 0 and set(int8_graph["auc_change_vs_torch"]) == set(TASKS)
    assert all(np.isfinite(change) for change in int8_graph["auc_change_vs_torch"].values())
