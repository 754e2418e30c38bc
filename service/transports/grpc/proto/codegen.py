"""Generate the gRPC/protobuf Python modules from the `.proto` files beside this file.

Run at build time (`make proto`, the Dockerfile): the generated `*_pb2*.py` are never committed.
Imports in generated gRPC stubs are rewritten to package-relative ones so `service.transports.grpc.proto` is
importable from anywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate() -> list[Path]:
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    protos = sorted(HERE.glob("*.proto"))
    if not protos:
        return []
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={HERE}", f"--grpc_python_out={HERE}",
            f"--pyi_out={HERE}"]
    if protoc.main([*args, *(str(p) for p in protos)]) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    written = []
    for stub in HERE.glob("*_pb2*.py"):
        text = stub.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        if fixed != text:
            stub.write_text(fixed)
        written.append(stub)
    return written


if __name__ == "__main__":
    files = generate()
    sys.stdout.write(f"generated {len(files)} protobuf modules\n")
