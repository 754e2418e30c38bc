"""`make demo` where the Tmall files are absent: it says so in one line, generates a small
synthetic set, and goes all the way to a ranked response over REST and gRPC (with the synthetic
spec's request context)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from feature_store.embedded import free_port

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]


def test_demo_falls_back_to_synthetic_data(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    cmd = [sys.executable, "-m", "service.demo", "--data", str(empty), "--workdir", str(tmp_path / "work"),
           "--epochs", "1", "--http-port", str(free_port("127.0.0.1")), "--grpc-port", str(free_port("127.0.0.1"))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (notice,) = [line for line in output.splitlines() if "Tmall 2014 not found" in line]
    assert "synthetic" in notice
    assert "REST and gRPC agree on the ranking: True" in done.stdout
    assert '"model": "synthetic/1"' in done.stdout
    # the synthetic set's spec declares request context (device, hour): the demo sends it, and prints it
    assert '"context": {"device": ' in done.stdout, done.stdout[-3000:]
