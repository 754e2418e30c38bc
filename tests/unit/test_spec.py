"""The feature spec on its own: validation errors as one line naming the field, YAML loading, the
side-feature encoders (fit, encode, serialize), request-context encoding and id resolution.

Reading a spec's files is tests/unit/test_readers.py; the service's wrappers of `encode_context`
and `resolve_id` (InvalidRequest, candidates) are tests/unit/test_service_request_features.py.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from feature_store.errors import UserError
from feature_store.spec import (
    INT64_MAX,
    MAX_CONTEXT_STRING,
    CategoricalDecl,
    CategoricalEncoder,
    ContextError,
    FeatureGroup,
    FeatureSpec,
    NumericDecl,
    NumericEncoder,
    SideFeatures,
    SpecError,
    encode_context,
    resolve_id,
    stable_id_hash,
)
from tests.shop_data import SPEC_YAML

Doc = dict[str, Any]


def shop_doc() -> Doc:
    doc = yaml.safe_load(SPEC_YAML)
    assert isinstance(doc, dict)
    return doc


def error_of(edit: Callable[[Doc], object]) -> str:
    """The SpecError message of the shop spec after `edit`; it must be one line naming the source."""
    doc = shop_doc()
    edit(doc)
    with pytest.raises(SpecError) as info:
        FeatureSpec.parse(doc, "shop.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("shop.yaml: "), msg
    return msg


# -- validation --------------------------------------------------------------------------------------------


def test_the_shop_spec_is_valid() -> None:
    spec = FeatureSpec.parse(shop_doc())
    assert spec.behaviour_actions == ("view", "like", "buy") and spec.impression_action == "impression"
    assert [(t.name, t.parent) for t in spec.tasks] == [("engage", None), ("buy", "engage")]
    assert spec.item_features is not None and [d.name for d in spec.item_features.categorical] == ["brand", "seller"]
    assert spec.item_features.numeric[0].log1p  # the `[brand, seller]` shorthand and the long form mix


def test_a_spec_error_is_a_user_error() -> None:  # so the CLI prints it as one line and exits 2
    assert issubclass(SpecError, UserError) and issubclass(SpecError, ValueError)


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    """An edit setting `a.b[1].c` (dots and list indices) of the document to `value`."""

    def edit(doc: Doc) -> None:
        keys: list[str | int] = []
        for part in path.split("."):
            name, *indices = part.replace("]", "").split("[")
            keys += [name, *map(int, indices)]
        at: Any = doc
        for key in keys[:-1]:
            at = at[key]
        at[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        pytest.param(_set("taskz", []), ["taskz: unknown key", "docs/SCHEMA.md"], id="unknown-top-level-key"),
        pytest.param(_set("events.usr", "u"), ["events.usr: unknown key"], id="unknown-events-key"),
        pytest.param(
            _set("item_features.numeric[0].scale", 2),
            ["item_features.numeric[0].scale: unknown key"],
            id="unknown-deep-key",
        ),
        pytest.param(
            _set("tasks[1].positive", ["bye"]),
            ["tasks[1].positive: unknown action 'bye'", "declared: ['view', 'like', 'buy', 'impression']"],
            id="task-unknown-action",
        ),
        pytest.param(_set("tasks[0].parent", "buy"), ["tasks[0].parent: cycle engage -> buy -> engage"], id="cycle"),
        pytest.param(_set("tasks[0].parent", "engage"), ["tasks[0].parent: cycle engage -> engage"], id="self-parent"),
        pytest.param(
            _set("tasks[1].parent", "click"),
            ["tasks[1].parent: unknown task 'click'", "declared: ['engage', 'buy']"],
            id="unknown-parent",
        ),
        pytest.param(
            lambda d: d["tasks"].append({"name": "buy", "positive": ["like"]}),
            ["tasks: names must be unique", "'buy', 'buy'"],
            id="duplicate-task",
        ),
        pytest.param(
            lambda d: d["context_features"]["categorical"].append("brand"),
            ["context_features: 'brand' is already declared in item_features"],
            id="feature-in-two-groups",
        ),
        pytest.param(
            lambda d: d["user_features"]["numeric"].append("city"),
            ["user_features: 'city' is already declared in user_features"],
            id="feature-twice-in-a-group",
        ),
        pytest.param(
            _set("actions.like", ["like", "view"]),
            ["actions.like: file value 'view' already means 'view'"],
            id="value-of-two-actions",
        ),
        pytest.param(
            _set("tasks[0].positive", ["view", "impression"]),
            ["tasks[0].positive: 'impression' is the impression action, which is never positive"],
            id="impression-positive",
        ),
        pytest.param(
            _set("impression", "like"),
            ["tasks[0].positive: 'like' is the impression action"],
            id="declared-impression-positive",
        ),
        pytest.param(
            _set("impression", "shown"), ["impression: 'shown' is not one of the actions"], id="unknown-impression"
        ),
        pytest.param(
            _set("tasks[0].transform", "sqrt"),
            ["tasks[0].transform: must be identity, log or power:<exponent>, got 'sqrt'"],
            id="transform",
        ),
        pytest.param(_set("tasks[1].transform", "power:x"), ["tasks[1].transform:", "'power:x'"], id="power-arg"),
        pytest.param(_set("tasks[1].transform", "power:nan"), ["tasks[1].transform:", "'power:nan'"], id="power-nan"),
        pytest.param(_set("tasks[1].transform", "log:2"), ["tasks[1].transform:", "'log:2'"], id="log-arg"),
        pytest.param(_set("tasks", []), ["tasks: List should have at least 1 item"], id="no-tasks"),
        pytest.param(
            _set("tasks[0].positive", []),
            ["tasks[0].positive: List should have at least 1 item"],
            id="task-without-positive",
        ),
        pytest.param(_set("actions.view", []), ["actions.view: list at least one file value"], id="empty-action"),
        pytest.param(
            _set("actions", {"impression": ["shown"]}),
            ["actions: declare at least one action besides"],
            id="only-impression",
        ),
        pytest.param(_set("actions.bad-name", ["x"]), ["actions: name 'bad-name' must match"], id="action-name"),
        pytest.param(
            _set("tasks[0].weight", -1),
            ["tasks[0].weight: Input should be greater than or equal to 0"],
            id="negative-weight",
        ),
        pytest.param(
            _set("item_features.numeric[0].default", math.inf),
            ["item_features.numeric[0].default:", "finite"],
            id="infinite-default",
        ),
        pytest.param(_set("sequence.short_length", 0), ["sequence.short_length:"], id="short-length"),
        pytest.param(_set("events", None), ["events:"], id="events-null"),
    ],
)
def test_invalid_specs_name_the_field(edit: Callable[[Doc], object], fragments: list[str]) -> None:
    msg = error_of(edit)
    for fragment in fragments:
        assert fragment in msg, msg


def test_only_the_first_error_is_spelled_out() -> None:
    msg = error_of(lambda d: d.update(taskz=1, colour=2))
    assert "unknown key" in msg and msg.endswith("(and 1 more)"), msg


def test_action_values_are_text_and_a_power_transform_is_accepted() -> None:
    doc = shop_doc()
    doc["actions"] = {"click": 0, "buy": [1, "1.5"], "impression": ["imp"]}
    doc["tasks"] = [
        {"name": "engage", "positive": ["click", "buy"], "transform": "log"},
        {"name": "buy", "positive": ["buy"], "parent": "engage", "transform": "power:0.5"},
    ]
    spec = FeatureSpec.parse(doc)
    assert spec.actions == {"click": ["0"], "buy": ["1", "1.5"], "impression": ["imp"]}
    assert [t.transform for t in spec.tasks] == ["log", "power:0.5"]


def test_parse_refuses_a_document_that_is_not_a_mapping() -> None:
    for doc in (None, [1, 2], "name: x"):
        with pytest.raises(SpecError, match=r"^x\.yaml: expected a mapping at the top level, got "):
            FeatureSpec.parse(doc, "x.yaml")


def test_round_trip() -> None:
    spec = FeatureSpec.parse(shop_doc())
    assert FeatureSpec.parse(spec.model_dump(mode="json")) == spec
    assert FeatureSpec.parse(yaml.safe_load(spec.to_yaml())) == spec
    # the order of the actions is their codes: it survives the round trip
    assert list(FeatureSpec.parse(yaml.safe_load(spec.to_yaml())).actions) == ["view", "like", "buy", "impression"]
    other = shop_doc()
    other["tasks"][1]["weight"] = 3
    assert FeatureSpec.parse(other) != spec


# -- loading YAML files --------------------------------------------------------------------------------------


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(SPEC_YAML)
    assert FeatureSpec.load(path) == FeatureSpec.parse(shop_doc())
    path.write_text(SPEC_YAML.replace("weight: 10", "weight: 10, colour: red"))
    with pytest.raises(SpecError, match=rf"^{path}: tasks\[1\]\.colour: unknown key"):
        FeatureSpec.load(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("name: shop\nevents: {path: e.csv\ntasks: []\n", r": line \d+ not valid YAML: "),  # unclosed flow mapping
        ("name: [shop\n", r": line \d+ not valid YAML: "),
        ("- name: shop\n", r": expected a mapping at the top level, got list$"),
        ("just text\n", r": expected a mapping at the top level, got str$"),
        ("", r": expected a mapping at the top level, got NoneType$"),
        # PyYAML keeps the last of a repeated key silently: the spec loader refuses it instead
        (
            SPEC_YAML.replace("like: [like]", "like: [like], view: [v2]"),
            r": line 3 not valid YAML: found duplicate "
            r"key 'view'$",
        ),
        (SPEC_YAML + "tasks: []\n", r": line 11 not valid YAML: found duplicate key 'tasks'$"),
    ],
    ids=["unclosed-mapping", "unclosed-list", "list", "scalar", "empty", "duplicate-action", "duplicate-top-level"],
)
def test_load_errors_name_the_file(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "my_spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        FeatureSpec.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    assert re.search(pattern, msg), msg


def test_load_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    """A `<<:` merge followed by an explicit key is not a repeated key."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        SPEC_YAML.replace("- {name: engage,", "- &engage {name: engage,").replace(
            "- {name: buy,", "- {<<: *engage, name: buy,"
        )
    )
    spec = FeatureSpec.load(path)
    assert spec == FeatureSpec.parse(shop_doc())


def test_load_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"^feature spec not found: {tmp_path / 'nope.yaml'}$"):
        FeatureSpec.load(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=rf"^cannot read feature spec {tmp_path}"):
        FeatureSpec.load(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match=rf"^cannot read feature spec {binary}"):
        FeatureSpec.load(binary)


# -- categorical encoder -----------------------------------------------------------------------------------


def test_categorical_fit_ranks_by_frequency_then_value() -> None:
    values = ["b", "a", "c", "b", "a", "d", None, "", "  ", float("nan"), "c ", 7, 7.0, 7.5]
    enc = CategoricalEncoder.fit(CategoricalDecl(name="x"), values)
    # counts: b 2, a 2, c 2 ("c " stripped), 7 2 (7.0 loses its ".0"), d 1, 7.5 1; missing ones are not values
    assert enc.vocabulary == ("7", "a", "b", "c", "7.5", "d")
    assert CategoricalEncoder.fit(CategoricalDecl(name="x"), list(reversed(values))).vocabulary == enc.vocabulary
    capped = CategoricalEncoder.fit(CategoricalDecl(name="x", max_vocabulary=3), values)
    assert capped.vocabulary == ("7", "a", "b") and capped.size == 4
    counted = CategoricalEncoder.fit_counts(
        CategoricalDecl(name="x"), ["b", "a", "c", "a", None, 7.0, "d"], [2, 1, 2, 1, 9, 2, 1]
    )
    assert counted.vocabulary == ("7", "a", "b", "c", "d")  # a: 1 + 1


def test_categorical_encode_oov_missing_and_default() -> None:
    enc = CategoricalEncoder("x", ("ios", "web", "3"))
    assert enc.encode(["ios", "web", "3", 3, 3.0, " web ", "android", None, "", float("nan")]).tolist() == [
        1,
        2,
        3,
        3,
        3,
        2,
        0,
        0,
        0,
        0,
    ]
    assert enc.encode([]).dtype == np.int64 and enc.size == 4
    with_default = CategoricalEncoder("x", ("ios", "web"), default="web")
    assert with_default.encode([None, "", "ios", "tv"]).tolist() == [2, 2, 1, 0]
    unknown_default = CategoricalEncoder("x", ("ios",), default="tv")
    assert unknown_default.encode_one(None) == 0  # a default outside the vocabulary is itself OOV


def test_categorical_hash_buckets() -> None:
    enc = CategoricalEncoder("x", ("a", "b"), hash_buckets=5)
    assert enc.size == 1 + 2 + 5
    codes = enc.encode([f"v{k}" for k in range(200)])
    assert ((codes >= 3) & (codes < 8)).all() and len(set(codes.tolist())) == 5
    expected = [3 + int(stable_id_hash([f"v{k}"])[0] % 5) for k in range(200)]
    assert codes.tolist() == expected  # stable: the same bucket in training, ingestion and requests
    assert enc.encode(["a", None, ""]).tolist() == [1, 0, 0]  # missing stays 0, never a bucket
    hashed_default = CategoricalEncoder("x", ("a",), hash_buckets=4, default="zz")
    assert hashed_default.encode_one(None) == hashed_default.encode_one("zz") == 2 + int(stable_id_hash(["zz"])[0] % 4)


def test_categorical_to_dict_round_trip() -> None:
    decl = CategoricalDecl(name="brand", max_vocabulary=2, hash_buckets=3, default="acme")
    enc = CategoricalEncoder.fit(decl, ["acme", "zeta", "acme", "omni", "zeta", "x"])
    d = enc.to_dict()
    assert d == {"name": "brand", "vocabulary": ["acme", "zeta"], "hash_buckets": 3, "default": "acme"}
    back = CategoricalEncoder.from_dict(d)
    assert back.to_dict() == d
    probe = ["acme", "omni", None, "zeta", "new"]
    assert back.encode(probe).tolist() == enc.encode(probe).tolist()


# -- numeric encoder ---------------------------------------------------------------------------------------


def test_numeric_fit_standardizes() -> None:
    enc = NumericEncoder.fit(NumericDecl(name="age"), [10, 20, 30, "40", None])  # None: the default 0
    raw = np.array([10, 20, 30, 40, 0], dtype=np.float64)
    assert enc.mean == pytest.approx(raw.mean()) and enc.std == pytest.approx(raw.std())
    out = enc.encode([10, 40.0, "20"])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (np.array([10, 40, 20]) - raw.mean()) / raw.std(), rtol=1e-6)
    # the vectorized path (a numeric numpy column) agrees with the per-value path
    column = np.array([10.0, np.nan, np.inf, 40.0])
    np.testing.assert_array_equal(enc.encode(column), enc.encode([10, None, "inf", 40]))


def test_numeric_fit_of_a_constant_or_empty_column() -> None:
    constant = NumericEncoder.fit(NumericDecl(name="x"), [5, 5, 5])
    assert (constant.mean, constant.std) == (5.0, 1.0)  # no division by zero
    empty = NumericEncoder.fit(NumericDecl(name="x"), [])
    assert (empty.mean, empty.std) == (0.0, 1.0)
    assert empty.encode([2.5]).tolist() == [2.5]


def test_numeric_log1p() -> None:
    enc = NumericEncoder("price", 0.0, 1.0, default=0.0, log1p=True)
    np.testing.assert_allclose(enc.encode([0, math.e - 1, 99, -5]), [0.0, 1.0, math.log(100), 0.0], rtol=1e-6)
    fitted = NumericEncoder.fit(NumericDecl(name="price", log1p=True), [0, 9, 99])
    logs = np.log1p([0.0, 9.0, 99.0])
    assert fitted.mean == pytest.approx(logs.mean()) and fitted.std == pytest.approx(logs.std())


def test_a_table_value_beyond_float32_once_normalized_takes_the_default() -> None:
    """A finite price of 1e40 would be stored as +inf and fed to the scorer; a table row takes the
    default instead, as a non-finite value does (a request context refuses it by name)."""
    group = FeatureGroup((), (NumericEncoder("price", 1.0, 2.0, default=5.0),))
    _, values = group.encode_rows({"price": [3.0, 1e40, -1e300, np.float64(1e39)]}, 4)
    assert values[:, 0].tolist() == [1.0, 2.0, 2.0, 2.0]
    _, column = group.encode_rows({"price": np.array([3.0, 1e40])}, 2)  # a numeric column: the vectorized path
    assert column[:, 0].tolist() == [1.0, 2.0]


def test_numeric_missing_non_finite_and_non_numeric_take_the_default() -> None:
    enc = NumericEncoder("x", 1.0, 2.0, default=5.0)
    bad = [None, "", float("nan"), float("inf"), -math.inf, "abc", True, False, [1], {"a": 1}, "nan"]
    assert enc.encode(bad).tolist() == [2.0] * len(bad)  # (5 - 1) / 2
    assert enc.encode([3, "3", " 3 ", 3.0]).tolist() == [1.0] * 4
    logged = NumericEncoder("x", 0.0, 1.0, default=math.e - 1, log1p=True)
    assert logged.encode([None]).tolist() == pytest.approx([1.0])  # the default goes through the transform


def test_numeric_to_dict_round_trip() -> None:
    enc = NumericEncoder.fit(NumericDecl(name="price", default=1.5, log1p=True), [1, 10, 100])
    back = NumericEncoder.from_dict(enc.to_dict())
    assert (
        back.to_dict()
        == enc.to_dict()
        == {"name": "price", "mean": enc.mean, "std": enc.std, "default": 1.5, "log1p": True}
    )
    np.testing.assert_array_equal(back.encode([3, None, "x"]), enc.encode([3, None, "x"]))


# -- fitted side features ------------------------------------------------------------------------------------


def fitted_shop() -> SideFeatures:
    spec = FeatureSpec.parse(shop_doc())
    columns: dict[str, dict[str, list[Any]]] = {
        "item": {"brand": ["acme", "acme", "zeta"], "seller": ["s1", None, "s2"], "price": [10.0, 20.0, None]},
        "user": {"city": ["paris", "lyon"], "age": [30, 40]},
        "context": {"device": ["ios", "web", "ios"], "hour": [1.0, 2.0, 3.0]},
    }
    return SideFeatures.fit(spec, columns)


def test_side_features_fit_in_the_scorers_order() -> None:
    side = fitted_shop()
    assert side.user.names == ("city", "age") and side.item.names == ("brand", "seller", "price")
    assert side.context.names == ("device", "hour")
    assert side.item.categorical[0].vocabulary == ("acme", "zeta") and side.item.numeric[0].log1p
    assert (side.n_ids, side.n_values) == (4, 3)
    sizes = [3, 3, 3, 3]  # city 1+2, brand 1+2, seller 1+2, device 1+2
    assert side.id_offsets.tolist() == [0, 3, 6, 9] and side.table_rows == sum(sizes)
    empty = SideFeatures()
    assert (empty.n_ids, empty.n_values, empty.table_rows, empty.id_offsets.tolist()) == (0, 0, 0, [])
    no_side = FeatureSpec.parse({k: v for k, v in shop_doc().items() if not k.endswith("_features")})
    assert SideFeatures.fit(no_side, {}) == empty


def test_side_features_round_trip_and_value_equality() -> None:
    side = fitted_shop()
    d = side.to_dict()
    assert list(d) == ["user", "item", "context"]
    back = SideFeatures.from_dict(d)
    assert back == side and hash(back) == hash(side) and back is not side
    assert back.to_dict() == d
    assert SideFeatures.from_dict(yaml.safe_load(yaml.safe_dump(d))) == side  # through a file format too
    assert fitted_shop() == side  # fitting is deterministic
    changed = copy.deepcopy(d)
    changed["item"]["categorical"][0]["vocabulary"] = ["zeta", "acme"]
    assert SideFeatures.from_dict(changed) != side
    assert side != d and SideFeatures.from_dict({}) == SideFeatures()
    ids, values = back.item.encode_rows({"brand": ["zeta", "acme"], "price": [10.0, None]}, 2)
    assert ids.tolist() == [[2, 0], [1, 0]]  # no seller column: missing -> 0
    assert values.shape == (2, 1) and values.dtype == np.float32


# -- request context -----------------------------------------------------------------------------------------

CONTEXT = FeatureGroup(
    (CategoricalEncoder("device", ("ios", "android", "3"), default="ios"),),
    (NumericEncoder("hour", 12.0, 6.0), NumericEncoder("temp", 0.0, 1.0, default=20.0)),
)


def test_context_encodes_and_missing_names_take_defaults() -> None:
    ids, values = encode_context(CONTEXT, {"device": "android", "hour": 18, "temp": 1.5})
    assert ids.tolist() == [2] and values.tolist() == [1.0, 1.5]
    assert ids.dtype == np.int64 and values.dtype == np.float32
    for missing in (None, {}, {"device": None, "hour": None, "temp": None}):
        ids, values = encode_context(CONTEXT, missing)
        assert ids.tolist() == [1] and values.tolist() == [-2.0, 20.0]
    assert encode_context(CONTEXT, {"device": 3})[0].tolist() == [3]  # a number for a categorical: its text
    assert encode_context(CONTEXT, {"device": 3.0})[0].tolist() == [3]
    assert encode_context(CONTEXT, {"device": "tv"})[0].tolist() == [0]  # unseen: out of vocabulary
    assert encode_context(CONTEXT, {"device": "x" * MAX_CONTEXT_STRING})[0].tolist() == [0]  # at the limit


@pytest.mark.parametrize(
    ("context", "fragments"),
    [
        ({"weather": "rain"}, ["context.weather: unknown context feature", "['device', 'hour', 'temp']"]),
        ({"zz": 1, "aa": 2}, ["context.aa: unknown"]),  # the first unknown name, sorted
        ({"hour": "13"}, ["context.hour: expected a finite number, got str '13'"]),
        ({"hour": True}, ["context.hour: expected a finite number, got bool"]),
        ({"hour": float("nan")}, ["context.hour: expected a finite number"]),
        ({"temp": float("inf")}, ["context.temp: expected a finite number"]),
        ({"hour": [1]}, ["context.hour:", "list"]),
        ({"device": False}, ["context.device: expected a string, got bool"]),
        ({"device": {"os": "ios"}}, ["context.device: expected a string, got dict"]),
        ({"device": float("inf")}, ["context.device: expected a string, got a non-finite number"]),
        ({"device": "x" * (MAX_CONTEXT_STRING + 1)}, [f"context.device: longer than {MAX_CONTEXT_STRING} characters"]),
        ({"hour": 1e300}, ["context.hour: 1e+300 is out of range"]),  # finite, not once normalized in float32
        ({"hour": 10**400}, ["context.hour: 1000000000", "is out of range"]),  # JSON integers have no bound
        ({"hour": -(10**309)}, ["context.hour: -1000000000", "is out of range"]),
    ],
)
def test_bad_context_names_the_field(context: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ContextError) as info:
        encode_context(CONTEXT, context)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_a_group_without_features_refuses_any_name() -> None:
    ids, values = encode_context(FeatureGroup(), None)
    assert ids.shape == (0,) and values.shape == (0,)
    with pytest.raises(ContextError, match=r"context\.device: unknown context feature; allowed: none"):
        encode_context(FeatureGroup(), {"device": "ios"})


# -- ids -------------------------------------------------------------------------------------------------------


def test_stable_id_hash_pinned_values() -> None:
    # Written once as literals: a change would silently re-key every stored string id.
    ids = stable_id_hash(["a", "sku-00001", "u-0000", "42", "é"])
    assert ids.dtype == np.int64
    assert ids.tolist() == [
        3405396810240292928,
        5387599732401627986,
        4403586599268228012,
        8820412187630416983,
        3394012004367669963,
    ]
    assert stable_id_hash([]).dtype == np.int64 and stable_id_hash([]).shape == (0,)
    many = stable_id_hash(f"id-{k}" for k in range(2000))  # any iterable; never negative
    assert (many >= 0).all() and len(set(many.tolist())) == 2000


def test_resolve_int_ids() -> None:
    assert resolve_id(42, "int") == 42
    assert resolve_id("42", "int") == resolve_id(" 42 ", "int") == resolve_id("+42", "int") == 42
    assert resolve_id("007", "int") == 7
    assert resolve_id(0, "int") == 0 and resolve_id(INT64_MAX, "int") == resolve_id(str(INT64_MAX), "int")


def test_resolve_string_ids() -> None:
    assert resolve_id("sku-00001", "string") == 5387599732401627986
    assert resolve_id(42, "string") == resolve_id("42", "string") == 8820412187630416983  # 42 is "42"
    assert resolve_id("007", "string") != resolve_id(7, "string")  # text is text: no integer reading
    assert resolve_id("x" * MAX_CONTEXT_STRING, "string") >= 0


@pytest.mark.parametrize(
    ("value", "id_type", "fragments"),
    [
        (True, "int", ["item_id must be an integer or a string, got a boolean"]),
        (False, "string", ["item_id", "boolean"]),
        ("abc", "int", ["item_id 'abc' is not an integer"]),
        ("4.0", "int", ["item_id '4.0' is not an integer"]),
        ("", "int", ["item_id '' is not an integer"]),
        ("1" * 20, "int", ["is not an integer"]),
        (-1, "int", ["item_id -1 is outside 0..2^63-1"]),
        ("-1", "int", ["outside 0..2^63-1"]),
        (INT64_MAX + 1, "int", ["outside 0..2^63-1"]),
        ("", "string", ["item_id must be a non-empty string"]),
        ("x" * (MAX_CONTEXT_STRING + 1), "string", [f"at most {MAX_CONTEXT_STRING} characters"]),
    ],
)
def test_resolve_id_refuses(value: Any, id_type: Any, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        resolve_id(value, id_type, "item_id")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
