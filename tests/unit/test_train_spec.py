"""A team's feature spec through the model commands: train (with and without side features),
evaluate and export read everything from the run, and the batches carry the side features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.bundle import open_bundle
from export.verify import verify
from feature_store.schema import SCORER_INPUTS, FeatureSchema
from feature_store.spec import FeatureSpec
from models.batching import Collator
from models.data.readers import load_spec_dataset
from models.data.samples import build_samples
from service.cli import main as cli_main
from tests.shop_data import write_shop

SMALL = ["--epochs", "1", "--no-progress", "--batch-size", "128", "--retrieval-k", "8", "--attn-dim", "8",
         "--repr-dim", "16", "--side-dim", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shop(tmp_path_factory.mktemp("shop"))


@pytest.fixture(scope="module")
def spec_run(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "shop"
    assert cli_main(["train", "--spec", str(shop), "--out", str(run), *SMALL]) == 0
    return run


def test_collator_gathers_side_rows(shop: Path) -> None:
    spec = FeatureSpec.load(shop)
    samples = build_samples(load_spec_dataset(spec, shop.parent), negatives_per_positive=2, seed=0)
    side = samples.schema.spec.side
    assert side.n_ids == 4 and side.n_values == 3  # brand, seller, city, device; price, age, hour
    idx = np.arange(0, len(samples), 7, dtype=np.int64)
    batch = Collator(samples, samples.schema.spec, 50)(idx)
    assert batch.side_ids is not None and batch.side_values is not None
    np.testing.assert_array_equal(batch.side_ids.numpy(), samples.side_ids[idx])
    np.testing.assert_array_equal(batch.side_values.numpy(), samples.side_values[idx])
    assert batch.cand_cross.shape[1] == samples.schema.spec.n_cross_features == 3 + 2  # view, like, buy
    assert batch.user_dense.shape[1] == samples.schema.spec.n_history_features == 3 + 1


def test_train_records_the_spec(shop: Path, spec_run: Path) -> None:
    config = json.loads((spec_run / "config.json").read_text())
    spec = FeatureSpec.load(shop)
    assert FeatureSpec.load(spec_run / "spec.yaml") == spec
    assert FeatureSpec.parse(config["feature_spec"]) == spec
    # the order of the actions is their codes: config.json keeps it (dict equality would not see it)
    assert list(config["feature_spec"]["actions"]) == list(spec.actions) == ["view", "like", "buy", "impression"]
    assert config["spec_base"] == str(shop.parent.resolve())
    assert config["side_features"] is True and config["data"] == "shop"
    schema = FeatureSchema.load(spec_run / "schema")
    assert config["schema_spec"] == schema.spec.to_dict()
    assert schema.spec.scorer_inputs == (*SCORER_INPUTS, "side_ids", "side_values")
    assert schema.spec.id_types == ("string", "string")
    assert {"split", "train", "model"} <= set(config) and config["model"]["side_dim"] == 4
    assert (spec_run / "din_short" / "spec.yaml").exists()


def test_evaluate_and_export_read_the_run(spec_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["evaluate", "--run", str(spec_run)]) == 0  # no data flags
    out = capsys.readouterr().out
    assert "buy\\|engage AUC" in out and "engage AUC" in out
    report = json.loads((spec_run / "eval.json").read_text())
    ours = report["results"]["twin (ours)"]
    assert set(ours) >= {"engage", "buy", "conditional", "ranking"}
    assert list(ours["conditional"]) == ["buy"] and ours["conditional"]["buy"]["parent"] == "engage"
    assert report["fusion"]["weights"] == {"engage": 1.0, "buy": 10.0}
    assert report["wr_weights"] == {"engage": 0.5, "buy": 0.5}
    assert "popularity" in report["results"] and "din-short" in report["results"]

    assert cli_main(["export", "--run", str(spec_run), "--out", str(tmp_path / "bundles")]) == 0
    path = tmp_path / "bundles" / "shop" / "1"
    bundle = open_bundle(path)
    assert bundle.spec_path is not None and bundle.spec_path.read_text() == (spec_run / "spec.yaml").read_text()
    assert "spec.yaml" in bundle.manifest["files"]
    assert bundle.fusion == {"weights": {"engage": 1.0, "buy": 10.0},
                             "transforms": {"engage": "identity", "buy": "identity"}}
    assert bundle.manifest["parity"]["max_abs_diff"] <= 1e-5
    assert verify(path)["scorer_inputs"] == list(bundle.schema.spec.scorer_inputs)


def test_train_without_side_features(shop: Path, tmp_path: Path) -> None:
    run = tmp_path / "noside"
    assert cli_main(["train", "--spec", str(shop), "--out", str(run), "--no-side-features", "--no-baselines",
                     *SMALL]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["side_features"] is False
    spec = FeatureSpec.load(run / "spec.yaml")
    assert spec.user_features is None and spec.item_features is None and spec.context_features is None
    assert [t.name for t in spec.tasks] == ["engage", "buy"] and spec.impression_action == "impression"
    schema = FeatureSchema.load(run / "schema")
    assert schema.spec.scorer_inputs == SCORER_INPUTS
    assert cli_main(["evaluate", "--run", str(run), "--max-queries", "20"]) == 0


def test_cross_features_read_the_whole_served_history_as_serving_does(shop: Path) -> None:
    """Training searches at most `max_history` behaviours; the user-item cross features must
    still count the whole served history (up to max_sequence_length), as the service does."""
    from feature_store.schema import cross_features_batch

    spec = FeatureSpec.load(shop)
    samples = build_samples(load_spec_dataset(spec, shop.parent), negatives_per_positive=2, seed=0)
    idx = np.arange(len(samples), dtype=np.int64)
    collator = Collator(samples, samples.schema.spec, 3)  # searches only the newest 3 behaviours
    start, end = collator.history_window(idx)
    got = collator.cross_features(idx, start, end)

    def reference(first: np.ndarray) -> np.ndarray:  # padded [B, L] histories over rows [first, end)
        width = max(int((end - first).max(initial=0)), 1)
        pos = end[:, None] - width + np.arange(width)[None, :]
        valid = pos >= first[:, None]
        rows = np.where(valid, pos, 0)
        return cross_features_batch(samples.ev_item[rows], samples.ev_action[rows], samples.ev_ts[rows], valid,
                                    samples.item[idx], samples.ts[idx], samples.schema.spec.n_actions)

    np.testing.assert_array_equal(got, reference(start))
    searched_only = reference(np.maximum(start, end - 3))
    assert (got != searched_only).any(axis=1).sum() > 0  # the case at stake occurs in this data
    np.testing.assert_array_equal(collator(idx[:64]).cand_cross.numpy(), got[:64])
