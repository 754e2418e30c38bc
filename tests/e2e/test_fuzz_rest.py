"""REST fuzzing with schemathesis, from the live server's own `/openapi.json`.

Every operation gets schema-valid (positive) and schema-violating (negative) requests generated
by Hypothesis, derandomized (the same cases on every run) and bounded per operation. Each answer
must not be a 5xx, must use a documented status code and content type, must match the response
schema, and invalid input must be rejected (4xx). The admin endpoint is fuzzed without its token
(what an attacker sees: 401 whatever the body), so fuzzing never changes the shared server's
state. At least 1,000 requests in total.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings

from tests.e2e.conftest import Server

pytestmark = pytest.mark.timeout(600)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
]
# generated cases per (operation, mode); operations without inputs have a single possible request
EXAMPLES = {"POST /v1/rank": 400, "POST /v1/admin/reload": 110}
MIN_TOTAL = 1000


def test_openapi_fuzz(live_server: Server) -> None:
    from schemathesis.checks import CHECKS as REGISTRY
    from schemathesis.checks import load_all_checks

    load_all_checks()
    checks = REGISTRY.get_by_names(CHECKS)
    schema = schemathesis.openapi.from_url(live_server.base_url + "/openapi.json", timeout=10)
    session = requests.Session()
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    def fuzz(operation: Any, mode: Any) -> None:
        key = f"{operation.label} {mode.value}"

        @settings(
            max_examples=EXAMPLES.get(operation.label, 5),
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            response = case.call_and_validate(base_url=live_server.base_url, session=session, checks=checks, timeout=10)
            counts[key] += 1
            statuses[response.status_code] += 1

        one()

    for result in schema.get_all_operations():
        operation = result.ok()
        fuzz(operation, schemathesis.GenerationMode.POSITIVE)
        if operation.body or any(True for _ in operation.iter_parameters()):  # nothing to violate otherwise
            fuzz(operation, schemathesis.GenerationMode.NEGATIVE)

    total = sum(counts.values())
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {total} cases in {elapsed:.0f} s; per operation and mode {dict(counts)}; "
          f"statuses {dict(sorted(statuses.items()))}")
    assert total >= MIN_TOTAL, counts
    assert not [s for s in statuses if s >= 500]
    assert counts["POST /v1/rank negative"] >= 300 and counts["POST /v1/rank positive"] >= 300
