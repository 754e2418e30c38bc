"""`service.assemble.side_plan` is cached by identity: a request must not hash the schema's side
features (their hash is a JSON dump of every fitted vocabulary, milliseconds with large ones)."""

from __future__ import annotations

import dataclasses

import numpy as np

from feature_store.spec import SideFeatures
from service.assemble import side_plan
from tests.helpers import side_schema


class _Unhashable(SideFeatures):
    def __hash__(self) -> int:
        raise AssertionError("side_plan hashed the side features")


def test_side_plan_does_not_hash_and_is_per_object() -> None:
    side = side_schema().spec.side
    probe = _Unhashable(**{f.name: getattr(side, f.name) for f in dataclasses.fields(side)})
    plan = side_plan(probe)
    assert side_plan(probe) is plan  # cached: the same object answers with the same plan
    other = side_plan(side)
    assert other is not plan and other is side_plan(side)
    np.testing.assert_array_equal(plan.offsets, other.offsets)
    assert (plan.n_ids, plan.n_values) == (side.n_ids, side.n_values)
