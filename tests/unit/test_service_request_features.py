"""The service's per-request feature handling, without a server: ids as sent (integers or strings)
resolved per the model's id types, the request context encoded with the model's schema, and the
scorer's side inputs assembled from store bytes (pure numpy, no torch)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from feature_store.codecs import CodecError, Sequence, encode_side
from feature_store.schema import SCORER_INPUTS, SchemaSpec, TaskSpec, history_features
from feature_store.spec import (
    MAX_CONTEXT_STRING,
    CategoricalEncoder,
    FeatureGroup,
    NumericEncoder,
    SideFeatures,
    stable_id_hash,
)
from service.assemble import RetrievalSettings, SideRows, Tables, scorer_inputs, side_inputs
from service.errors import InvalidRequest
from service.experiments.spec import bucket_of
from service.ids import resolve_candidates, resolve_user
from service.registry import LoadedModel
from service.retrieval import make_retriever

INT64_MAX = (1 << 63) - 1
NOW = 1_700_000_000


# -- ids ---------------------------------------------------------------------------------------------------


def test_int_ids_pass_through_and_integer_text_is_read() -> None:
    assert resolve_user(42, "int") == 42
    assert resolve_user("42", "int") == 42
    assert resolve_candidates([3, 1, 2], "int") == [3, 1, 2]
    assert resolve_candidates([3, "7", 2], "int") == [3, 7, 2]
    assert resolve_candidates([], "int") == []
    assert resolve_candidates([0, INT64_MAX], "int") == [0, INT64_MAX]


def test_string_ids_are_hashed_stably_and_integers_are_their_text() -> None:
    expected = int(stable_id_hash(["u-1"])[0])
    assert resolve_user("u-1", "string") == expected
    assert resolve_user(42, "string") == resolve_user("42", "string") == int(stable_id_hash(["42"])[0])
    keys = resolve_candidates(["a", "b", 7], "string")
    assert keys == stable_id_hash(["a", "b", "7"]).tolist()
    assert resolve_candidates(["a", "b"], "string") == keys[:2]  # the all-strings fast path agrees


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (lambda: resolve_user("abc", "int"), ["user_id", "'abc'", "integer"]),
        (lambda: resolve_user(-5, "int"), ["user_id must be an integer"]),
        (lambda: resolve_user(True, "int"), ["user_id", "boolean"]),
        (lambda: resolve_user("", "string"), ["user_id", "non-empty"]),
        (lambda: resolve_user("x" * (MAX_CONTEXT_STRING + 1), "string"), ["user_id", str(MAX_CONTEXT_STRING)]),
        (lambda: resolve_candidates([1, 2, -1], "int"), ["candidates[2]", "candidate ids must be integers"]),
        (lambda: resolve_candidates([1, INT64_MAX + 1], "int"), ["candidates[1]"]),
        (lambda: resolve_candidates([1, "sku-9"], "int"), ["candidates[1]", "'sku-9'"]),
        (lambda: resolve_candidates(["a", ""], "string"), ["candidates[1]"]),
        (lambda: resolve_candidates(["a", False], "string"), ["candidates[1]", "boolean"]),
    ],
)
def test_bad_ids_name_the_field(call: Any, fragments: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        call()
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_an_integer_and_its_text_share_an_experiment_bucket() -> None:
    assert bucket_of("salt", 42) == bucket_of("salt", "42")


# -- context -----------------------------------------------------------------------------------------------


def side_features() -> SideFeatures:
    """User: segment (categorical), age (numeric); item: brand (categorical, 2 hash buckets), price
    (numeric, log1p); context: device (categorical), hour (numeric)."""
    return SideFeatures(
        user=FeatureGroup((CategoricalEncoder("segment", ("a", "b")),), (NumericEncoder("age", 30.0, 10.0, 25.0),)),
        item=FeatureGroup(
            (CategoricalEncoder("brand", ("acme", "zeta", "omni"), hash_buckets=2),),
            (NumericEncoder("price", 2.0, 1.0, 0.0, log1p=True),),
        ),
        context=FeatureGroup(
            (CategoricalEncoder("device", ("ios", "android"), default="ios"),), (NumericEncoder("hour", 12.0, 6.0),)
        ),
    )


def model_with(spec: SchemaSpec) -> LoadedModel:
    """A LoadedModel with only the schema: enough for ids and context (no scorer, no tables)."""
    bundle: Any = SimpleNamespace(schema=SimpleNamespace(spec=spec), name="m", version=1)
    return LoadedModel(bundle=bundle, scorer=None, tables=None, retrieval=None, fusion=None,  # type: ignore[arg-type]
                       retriever=None, loaded_at=0.0)  # type: ignore[arg-type]


SIDE_SPEC = SchemaSpec(name="shop", id_types=("string", "int"), side=side_features())


def test_context_is_encoded_with_the_models_schema_and_defaults_fill_the_rest() -> None:
    model = model_with(SIDE_SPEC)
    codes, values = model.encode_context({"device": "android", "hour": 18})
    assert codes.tolist() == [2] and values.tolist() == pytest.approx([1.0])
    codes, values = model.encode_context({})  # defaults: device "ios", hour 0 -> (0 - 12) / 6
    assert codes.tolist() == [1] and values.tolist() == pytest.approx([-2.0])
    codes, _ = model.encode_context({"device": None, "hour": 12})
    assert codes.tolist() == [1]
    assert model.has_side
    assert model.resolve_user("u-1") == int(stable_id_hash(["u-1"])[0])  # user ids are strings here
    assert model.resolve_items([5, "6"]) == [5, 6]  # item ids are integers


@pytest.mark.parametrize(
    ("context", "fragments"),
    [
        ({"weather": "rain"}, ["context.weather", "unknown", "device", "hour"]),
        ({"hour": True}, ["context.hour", "bool"]),
        ({"hour": "13"}, ["context.hour", "str"]),
        ({"device": {"os": "ios"}}, ["context.device", "dict"]),
        ({"device": ["ios"]}, ["context.device", "list"]),
        ({"device": "x" * (MAX_CONTEXT_STRING + 1)}, ["context.device", "longer than"]),
        ({"hour": 1e300}, ["context.hour", "out of range"]),  # finite, but not once normalized in float32
    ],
)
def test_bad_context_is_invalid_request_naming_the_field(context: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        model_with(SIDE_SPEC).encode_context(context)
    assert info.value.http_status == 422
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_a_model_without_context_features_refuses_any_name_and_skips_none() -> None:
    model = model_with(SchemaSpec())
    assert model.encode_context(None) is None and model.encode_context({}) is None
    assert not model.has_side
    with pytest.raises(InvalidRequest, match=r"context\.device: unknown context feature"):
        model.encode_context({"device": "ios"})


def test_scorer_inputs_of_the_schema() -> None:
    assert SIDE_SPEC.scorer_inputs == (*SCORER_INPUTS, "side_ids", "side_values")
    assert SchemaSpec().scorer_inputs == SCORER_INPUTS
    assert np.array_equal(SIDE_SPEC.side.id_offsets, [0, 3, 9])  # segment 1+2, brand 1+3+2, device 1+2


# -- side inputs: store tails + context -> side_ids / side_values ---------------------------------------------


def shop_spec(side: SideFeatures | None = None) -> SchemaSpec:
    """Three custom actions (so the derived features are 3 + 1 and 3 + 2 wide) and the side features."""
    return SchemaSpec(
        name="shop", actions=("view", "like", "buy"),
        tasks=(TaskSpec("view", ("view", "like", "buy")), TaskSpec("buy", ("buy",), parent="view")),
        side=side if side is not None else side_features(),
    )


def random_tables(spec: SchemaSpec, n_items: int = 50, n_cats: int = 6, n_users: int = 9, seed: int = 0) -> Tables:
    rng = np.random.default_rng(seed)
    a, r, u, h = 8, 6, 5, 2
    events = spec.n_actions * spec.time_gap_buckets

    def t(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return Tables(
        item_key=t(n_items, a), category_key=t(n_cats, a), item_query=t(n_items, a), category_query=t(n_cats, a),
        item_repr=t(n_items, r), category_repr=t(n_cats, r), user_repr=t(n_users, u),
        gsu_action_bias=t(spec.n_actions), gsu_gap_bias=t(spec.time_gap_buckets), event_key_bias=t(events, h),
        event_repr=t(events, r),
    )


def history(n_actions: int, length: int = 30, seed: int = 1) -> Sequence:
    rng = np.random.default_rng(seed)
    return Sequence(item=rng.integers(1, 50, length), category=rng.integers(1, 6, length),
                    action=rng.integers(0, n_actions, length),
                    timestamp=np.sort(rng.integers(NOW - 30 * 86_400, NOW - 60, length)))


def inputs_of(spec: SchemaSpec, side: SideRows | None, n_cand: int = 7) -> dict[str, np.ndarray]:
    tables = random_tables(spec)
    settings = RetrievalSettings(k=4, head_dim=4, short_length=5, use_retrieval=True,
                                 time_gap_buckets=spec.time_gap_buckets)
    rng = np.random.default_rng(2)
    return scorer_inputs(tables, settings, make_retriever("exact"), history(spec.n_actions), 3,
                         rng.integers(0, 50, n_cand), rng.integers(0, 6, n_cand), NOW, spec=spec, side=side)


def store_tails(side: SideFeatures, user: dict[str, Any] | None, items: list[dict[str, Any] | None]) -> SideRows:
    """What the store holds, encoded as ingestion does: the user's tail and the items' rows [n, W]."""
    user_tail = b""
    if user is not None:
        codes, values = side.user.encode_rows({k: [v] for k, v in user.items()}, 1)
        (user_tail,) = encode_side(codes, values)
    known = [it for it in items if it is not None]
    codes, values = side.item.encode_rows({k: [it.get(k) for it in known] for k in side.item.names}, len(known))
    tails = iter(encode_side(codes, values))
    width = 4 * (len(side.item.categorical) + len(side.item.numeric))
    rows = np.zeros((len(items), width if known else 0), dtype=np.uint8)
    for k, it in enumerate(items):
        if it is not None:
            rows[k] = np.frombuffer(next(tails), dtype=np.uint8)
    return SideRows(user_tail, rows, np.array([it is not None for it in items]))


def expected_side(side: SideFeatures, user: dict[str, Any] | None, items: list[dict[str, Any] | None],
                  context: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """side_ids / side_values computed row by row from the raw values, missing rows from `{}`."""
    ids, values = [], []
    for it in items:
        parts = [side.user.encode_rows({k: [v] for k, v in (user or {}).items()}, 1),
                 side.item.encode_rows({k: [v] for k, v in (it or {}).items()}, 1),
                 side.context.encode_rows({k: [v] for k, v in context.items()}, 1)]
        ids.append(np.concatenate([p[0][0] for p in parts]))
        values.append(np.concatenate([p[1][0] for p in parts]))
    return np.stack(ids) + side.id_offsets, np.stack(values)


USER = {"segment": "b", "age": 41.0}
ITEMS: list[dict[str, Any] | None] = [
    {"brand": "zeta", "price": 12.5}, None, {"brand": "unseen-brand", "price": 0.0}, {"brand": "acme"}, None,
    {"brand": "omni", "price": 999.0}, {"price": 3.0},
]
CONTEXT = {"device": "android", "hour": 18}


def test_side_inputs_concatenate_user_item_and_context_with_offsets() -> None:
    side = side_features()
    model = model_with(shop_spec(side))
    rows = store_tails(side, USER, ITEMS)
    rows = SideRows(rows.user_tail, rows.item_rows, rows.item_found, model.encode_context(CONTEXT))
    got = inputs_of(shop_spec(side), rows)
    assert tuple(got) == shop_spec(side).scorer_inputs  # the scorer's order: base inputs, side_ids, side_values
    ids, values = expected_side(side, USER, ITEMS, CONTEXT)
    assert got["side_ids"].dtype == np.int64 and got["side_values"].dtype == np.float32
    np.testing.assert_array_equal(got["side_ids"], ids)
    np.testing.assert_allclose(got["side_values"], values, rtol=1e-6)
    # a missing item takes the encoded defaults (price default 0 normalized is not 0), not zeros
    assert got["side_values"][1, 1] == pytest.approx((0.0 - 2.0) / 1.0)
    assert got["side_ids"][1, 1] == side.id_offsets[1]  # brand: the out-of-vocabulary code 0, offset
    # the unseen brand hashes into one of the two buckets after the vocabulary
    assert 1 + 3 <= got["side_ids"][2, 1] - side.id_offsets[1] < 1 + 3 + 2


def test_no_profile_no_found_items_and_no_context_are_all_defaults() -> None:
    side = side_features()
    items: list[dict[str, Any] | None] = [None] * 7
    for rows in (store_tails(side, None, items), None):  # rows of width 0 (nothing found), or nothing at all
        got = inputs_of(shop_spec(side), rows)
        ids, values = expected_side(side, None, items, {})
        np.testing.assert_array_equal(got["side_ids"], ids)
        np.testing.assert_allclose(got["side_values"], values, rtol=1e-6)
        assert got["side_ids"][0, 2] == side.id_offsets[2] + 1  # device's declared default "ios"
        assert got["side_values"][0, 0] == pytest.approx((25.0 - 30.0) / 10.0)  # the user's default age


def test_a_slice_of_the_rows_scores_the_slice() -> None:
    """Shadow steps score candidate slices: the slice's side rows are the full request's rows."""
    side = side_features()
    rows = store_tails(side, USER, ITEMS)
    full = side_inputs(side, rows, len(ITEMS))
    part = side_inputs(side, rows.rows(2, 5), 3)
    np.testing.assert_array_equal(part["side_ids"], full["side_ids"][2:5])
    np.testing.assert_array_equal(part["side_values"], full["side_values"][2:5])


@pytest.mark.parametrize(
    ("groups", "present"),
    [
        ({"user": FeatureGroup((CategoricalEncoder("segment", ("a",)),))}, ("side_ids",)),
        ({"context": FeatureGroup((), (NumericEncoder("hour", 12.0, 6.0),))}, ("side_values",)),
    ],
)
def test_only_the_side_inputs_the_schema_has(groups: dict[str, FeatureGroup], present: tuple[str, ...]) -> None:
    spec = shop_spec(SideFeatures(**groups))
    got = inputs_of(spec, None)
    assert tuple(got) == spec.scorer_inputs == (*SCORER_INPUTS, *present)


def test_derived_features_follow_the_schemas_actions() -> None:
    spec = shop_spec(SideFeatures())
    got = inputs_of(spec, None)
    assert tuple(got) == SCORER_INPUTS
    assert got["cand_cross"].shape == (7, spec.n_cross_features) == (7, 5)
    assert got["user_dense"].shape == (7, spec.n_history_features) == (7, 4)
    np.testing.assert_allclose(got["user_dense"][0], history_features(history(3).action, 3))


def test_a_tail_of_another_width_is_refused() -> None:
    side = side_features()
    rows = store_tails(side, USER, ITEMS)
    with pytest.raises(CodecError, match="side tail"):
        side_inputs(side, SideRows(rows.user_tail + b"\0\0\0\0"), 2)


def test_a_strategy_that_pads_a_long_history_attends_to_nothing_there() -> None:
    """sim_hard with fallback=pad pads a candidate whose category the history lacks, even when the
    history is longer than k: padding (-1) must stay padding, not become the newest behaviour."""
    spec = SchemaSpec()
    tables = random_tables(spec)
    settings = RetrievalSettings(k=4, head_dim=4, short_length=5, use_retrieval=True,
                                 time_gap_buckets=spec.time_gap_buckets)
    hist = history(spec.n_actions)  # 30 behaviours, categories 1-5
    cand_item, cand_cat = np.array([3, 4]), np.array([2, 9])  # category 9: nowhere in the history
    pad = scorer_inputs(tables, settings, make_retriever("sim_hard", fallback="pad"), hist, 3, cand_item, cand_cat, NOW)
    assert pad["long_attended"][:, 0].tolist() == [1.0, 0.0]
    assert not pad["long_pooled"][1].any()
