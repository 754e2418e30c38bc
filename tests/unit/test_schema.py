"""Schema, vocabularies and the derived features shared by training and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feature_store.schema import (
    ACTIONS,
    FeatureSchema,
    SchemaError,
    SchemaSpec,
    TaskSpec,
    Vocabulary,
    cross_features,
    cross_features_batch,
    history_features,
    history_features_batch,
    time_gap_bucket,
    weekday,
)


def test_vocabulary_lookup_maps_unknown_to_zero() -> None:
    vocab = Vocabulary.build([30, 10, 20, 10])
    assert vocab.size == 4
    np.testing.assert_array_equal(vocab.lookup([10, 20, 30, 40, -1]), [1, 2, 3, 0, 0])
    assert Vocabulary.build([]).lookup([5]).tolist() == [0]


def test_schema_hash_covers_spec_and_vocabularies(tmp_path: Path) -> None:
    v = Vocabulary.build([1, 2, 3])
    a = FeatureSchema(SchemaSpec(), v, v, v)
    assert a.hash == FeatureSchema(SchemaSpec(), v, v, v).hash
    assert a.hash != FeatureSchema(SchemaSpec(), v, Vocabulary.build([1, 2, 4]), v).hash
    assert a.hash != FeatureSchema(SchemaSpec(short_sequence_length=7), v, v, v).hash
    a.save(tmp_path)
    assert FeatureSchema.load(tmp_path).hash == a.hash
    np.save(tmp_path / "vocab_item.npy", np.array([1, 2, 5], dtype="<i8"))
    with pytest.raises(SchemaError, match="does not match its recorded hash"):
        FeatureSchema.load(tmp_path)


@pytest.mark.parametrize("doc", ["[]", "{}", '{"spec": 3}', '"schema"'])
def test_a_schema_file_of_another_shape_is_a_schema_error(doc: str, tmp_path: Path) -> None:
    v = Vocabulary.build([1, 2, 3])
    schema = FeatureSchema(SchemaSpec(), v, v, v)
    schema.save(tmp_path)
    (tmp_path / "schema.json").write_text(doc)
    with pytest.raises(SchemaError, match="is not a schema"):
        FeatureSchema.load(tmp_path)


def test_spec_validation_messages() -> None:
    with pytest.raises(SchemaError, match="unknown actions"):
        SchemaSpec(tasks=(TaskSpec("x", ("purchase",)),))
    with pytest.raises(SchemaError, match="unique"):
        SchemaSpec(tasks=(TaskSpec("a", ("click",)), TaskSpec("a", ("buy",))))
    spec = SchemaSpec()
    assert SchemaSpec.from_dict(spec.to_dict()) == spec
    assert spec.task_action_matrix()[ACTIONS.index("fav"), spec.task_names.index("cart")]


def test_time_gap_buckets_and_weekday() -> None:
    hour = 3600
    np.testing.assert_array_equal(time_gap_bucket([0, hour - 1, hour, 3 * hour, 10**9, -5], 16), [0, 0, 1, 2, 15, 0])
    assert weekday(0) == 3  # 1970-01-01 was a Thursday
    assert weekday(1_700_000_000) == 1  # 2023-11-14, a Tuesday


def test_history_features_batch_matches_single() -> None:
    rng = np.random.default_rng(0)
    lengths = [0, 3, 10]
    actions = rng.integers(0, 4, sum(lengths))
    batch = history_features_batch(actions, lengths)
    start = 0
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(batch[row], history_features(actions[start : start + n]))
        start += n


def test_cross_features_batch_matches_single() -> None:
    rng = np.random.default_rng(1)
    ts = 1_700_000_000
    n = 60
    hist_item = rng.integers(0, 8, n)  # few items: many revisits, and some unknown (0)
    hist_action = rng.integers(0, 4, n)
    hist_ts = np.sort(rng.integers(ts - 40 * 86_400, ts, n))
    cands = np.arange(0, 10)
    single = cross_features(hist_item, hist_action, hist_ts, cands, ts)
    width = n + 5  # padded on the left, as the training collator right-aligns histories
    valid = np.zeros((cands.shape[0], width), dtype=bool)
    valid[:, 5:] = True
    pad = lambda a: np.repeat(np.r_[np.full(5, 3), a][None], cands.shape[0], axis=0)  # noqa: E731
    batched = cross_features_batch(pad(hist_item), pad(hist_action), pad(hist_ts), valid, cands,
                                   np.full(cands.shape[0], ts))
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)
    assert np.all(single[0] == 0), "unknown items never match"
    assert np.all(single[8:] == 0), "items not in the history have no cross features"
    assert single[1:8, 4].min() == 1.0 or np.any(hist_item == 1)
    assert np.all(cross_features(hist_item[:0], hist_action[:0], hist_ts[:0], cands, ts) == 0)
