"""gRPC fuzzing with Hypothesis against the live server (`rankserve.v1.Ranker/Rank`).

Structured messages with any field values (extreme int64s, negative ids, top_n across int32,
request times far outside unix seconds, candidate lists around the count limit, arbitrary
request-id metadata); messages over the size limit; and raw bytes through a channel without
serializers (random garbage, and valid messages with bytes flipped or cut). Whatever arrives, the
answer is OK (with a sane ranking) or a client error that says what is wrong: never INTERNAL or
UNKNOWN. Derandomized: the same cases on every run.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service.transports.grpc.server import pb2, pb2_grpc
from tests.e2e.conftest import Server, World

pytestmark = pytest.mark.timeout(300)

METHOD = "/rankserve.v1.Ranker/Rank"
LIMIT_CANDIDATES, LIMIT_TOP_N, LIMIT_BYTES = 200, 100, 65536  # the live_server's settings
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
INT64 = st.one_of(
    st.sampled_from([-(2**63), -(2**31), -1, 0, 1, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, LIMIT_TOP_N, LIMIT_TOP_N + 1, 2**31 - 1]),
                  st.integers(-(2**31), 2**31 - 1))
REQUEST_ID = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.generate, Phase.shrink])

statuses: Counter[str] = Counter()


@pytest.fixture(scope="module")
def channel(live_server: Server) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 4 * LIMIT_BYTES)]  # let oversized requests reach the server
    with grpc.insecure_channel(live_server.grpc_target, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
    print(f"\ngRPC fuzz: {sum(statuses.values())} calls, status codes {dict(statuses)}")


def check_error(err: grpc.RpcError) -> None:
    code = err.code()
    statuses[code.name] += 1
    assert code in CLIENT_ERRORS, f"{code}: {err.details()}"
    assert err.details(), "an error must say what is wrong"


def problems(fields: dict[str, Any]) -> list[str]:
    """What is wrong with a request, as the fragments the server's message must contain."""
    found = []
    if fields["user_id"] < 0:
        found.append("user_id")
    if len(fields["candidates"]) > LIMIT_CANDIDATES:
        found.append(f"limit of {LIMIT_CANDIDATES}")
    if any(c < 0 for c in fields["candidates"]):
        found.append("candidate ids")
    if "top_n" in fields and not 1 <= fields["top_n"] <= LIMIT_TOP_N:
        found.append("top_n")
    if "request_time" in fields and not 0 <= fields["request_time"] < 2**32:
        found.append("request_time")
    return found


def requests(world: World) -> st.SearchStrategy[dict[str, Any]]:
    """Requests whose every field is valid about half the time, so that both the ranking path
    (with extreme but valid values) and every validation message get exercised."""
    valid_id = st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**53 + 1, 2**63 - 1]), st.integers(0, 2**63 - 1),
                         st.sampled_from(world.known_items))
    any_id = st.one_of(valid_id, INT64)

    def lists(element: st.SearchStrategy[int]) -> st.SearchStrategy[list[int]]:
        return st.one_of(st.lists(element, max_size=30),
                         st.lists(element, min_size=LIMIT_CANDIDATES - 5, max_size=LIMIT_CANDIDATES + 20))

    return st.fixed_dictionaries(
        {"user_id": st.one_of(valid_id, st.just(world.long_user), INT64),
         "candidates": st.one_of(lists(valid_id), lists(any_id))},
        optional={"top_n": st.one_of(st.integers(1, LIMIT_TOP_N), INT32),
                  "request_time": st.one_of(st.integers(0, 2**32 - 1), INT64),
                  "debug": st.booleans()},
    )


def test_structured_messages(channel: grpc.Channel, world: World) -> None:
    stub = pb2_grpc.RankerStub(channel)

    @settings(FUZZ, max_examples=350)
    @given(fields=requests(world), request_id=st.none() | REQUEST_ID)
    def one(fields: dict[str, Any], request_id: str | None) -> None:
        metadata = (("x-request-id", request_id),) if request_id is not None else None
        try:
            resp, call = stub.Rank.with_call(pb2.RankRequest(**fields), timeout=10, metadata=metadata)
        except grpc.RpcError as err:
            check_error(err)
            found = problems(fields)
            assert found, f"a valid request was refused: {err.details()}"
            assert any(f in (err.details() or "") for f in found), (found, err.details())
            return
        assert not problems(fields), f"an invalid request was accepted: {problems(fields)}"
        statuses["OK"] += 1
        wanted = min(len(fields["candidates"]), fields.get("top_n") or LIMIT_TOP_N)
        assert len(resp.items) == wanted
        assert {it.item_id for it in resp.items} <= set(fields["candidates"])
        scores = [it.score for it in resp.items]
        assert scores == sorted(scores, reverse=True)
        rid = dict(call.initial_metadata())["x-request-id"]
        assert resp.request_id == rid
        if request_id is not None and re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", request_id):
            assert rid == request_id
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", rid)

    one()


def test_messages_over_the_size_limit(channel: grpc.Channel) -> None:
    stub = pb2_grpc.RankerStub(channel)

    @settings(FUZZ, max_examples=10)
    @given(n=st.integers(LIMIT_BYTES // 9 + 100, LIMIT_BYTES // 4), user=INT64)
    def one(n: int, user: int) -> None:
        with pytest.raises(grpc.RpcError) as info:
            stub.Rank(pb2.RankRequest(user_id=user, candidates=[2**63 - 1] * n), timeout=10)  # 9 bytes each
        check_error(info.value)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    one()


def _raw_call(channel: grpc.Channel, payload: bytes) -> None:
    raw = channel.unary_unary(METHOD)  # bytes in, bytes out: the client serializes nothing
    try:
        reply = raw(payload, timeout=10)
    except grpc.RpcError as err:
        check_error(err)
        return
    statuses["OK"] += 1
    pb2.RankResponse.FromString(reply)  # a well-formed answer


def test_garbage_bytes(channel: grpc.Channel) -> None:
    @settings(FUZZ, max_examples=250)
    @given(payload=st.binary(max_size=2048))
    def one(payload: bytes) -> None:
        _raw_call(channel, payload)

    one()


def test_corrupted_valid_messages(channel: grpc.Channel, world: World) -> None:
    """Valid encodings with bytes flipped, inserted or cut: they reach the decoder's corners
    (bad varints, wrong wire types, lengths past the end, unknown fields)."""

    @settings(FUZZ, max_examples=200)
    @given(fields=requests(world), data=st.data())
    def one(fields: dict[str, Any], data: st.DataObject) -> None:
        payload = bytearray(pb2.RankRequest(**fields).SerializeToString())
        for _ in range(data.draw(st.integers(1, 4))):
            action = data.draw(st.sampled_from(["flip", "insert", "cut"]))
            at = data.draw(st.integers(0, max(0, len(payload) - 1)))
            if action == "flip" and payload:
                payload[at] ^= data.draw(st.integers(1, 255))
            elif action == "insert":
                payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
            else:
                del payload[at:]
        _raw_call(channel, bytes(payload))

    one()
