"""Assembling a request's side inputs must not hash the schema's side features (their hash is a
JSON dump of every fitted vocabulary: milliseconds with large ones) nor re-encode the defaults:
what derives from the schema is computed once per schema object."""

from __future__ import annotations

import dataclasses

import numpy as np

from feature_store.spec import SideFeatures
from service.assemble import side_inputs
from tests.helpers import side_schema


class _Unhashable(SideFeatures):
    def __hash__(self) -> int:
        raise AssertionError("assembling hashed the side features")


def test_side_inputs_neither_hash_nor_recompute_per_request() -> None:
    side = side_schema().spec.side
    probe = _Unhashable(**{f.name: getattr(side, f.name) for f in dataclasses.fields(side)})
    first = side_inputs(probe, None, 3)
    assert probe.default_rows is probe.default_rows and probe.id_offsets is probe.id_offsets  # computed once
    second = side_inputs(probe, None, 3)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
        np.testing.assert_array_equal(first[name], side_inputs(side, None, 3)[name])
    assert not probe.id_offsets.flags.writeable  # shared by every request: read-only
    assert first["side_ids"].shape == (3, side.n_ids) and first["side_values"].shape == (3, side.n_values)
