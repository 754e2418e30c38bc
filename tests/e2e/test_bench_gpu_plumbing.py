"""`rankserve bench --gpu` end to end on a machine without a GPU, its GPU parts replaced by CPU stand-ins.

This checks the plumbing only (sections, the batched transports run, the JSON report and the
markdown table), so that the command still works the day it runs on a GPU; nothing here says
anything about GPU speed or correctness. The stand-ins are installed by a small wrapper script
that patches `loadtest.bench_gpu` (preflight, the GPU settings and retrievers, the provider
name checked) and then calls the command line as `rankserve` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]

STAND_INS = '''
import sys
from loadtest import bench_gpu as g
from service.retrieval import make_retriever

g.GPU_SETTINGS = {"execution_provider": "cpu", "retrieval_device": "cpu"}
g.GPU_SERVER_ENV = {"RANKSERVE_EXECUTION_PROVIDER": "cpu", "RANKSERVE_RETRIEVAL_DEVICE": "cpu"}
g.CUDA_PROVIDER = "CPUExecutionProvider"
g.preflight = lambda probe=None: g.GpuInfo(devices=["stand-in"], onnxruntime="stand-in",
                                           ort_providers=["CPUExecutionProvider"], faiss="stand-in",
                                           faiss_gpu=True, faiss_gpus=1)
g.gpu_retrievers = lambda: {"faiss_gpu": make_retriever("faiss_knn"), "exact_gpu": make_retriever("exact")}
g.check_inprocess = lambda core: {"provider": core.registry.require().scorer.provider, "retrieval_device": "cpu"}

from service.cli import main

sys.exit(main(sys.argv[1:]))
'''


def test_bench_gpu_plumbing_with_cpu_stand_ins(tmp_path: Path) -> None:
    script = tmp_path / "stand_ins.py"
    script.write_text(STAND_INS)
    out, md = tmp_path / "bench-gpu.json", tmp_path / "bench-gpu.md"
    cmd = [sys.executable, str(script), "bench", "--gpu", "--data", "generated", "--items", "3000", "--users", "6",
           "--history", "300", "--candidates", "40", "--k", "16", "--iterations", "5", "--warmup", "2",
           "--levels", "1,4", "--level-requests", "20", "--out", str(out), "--out-md", str(md)]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["gpu"]["devices"] == ["stand-in"]
    assert report["server_env"]["RANKSERVE_EXECUTION_PROVIDER"] == "cpu"  # the stand-in of "cuda"
    assert {"faiss_gpu", "exact_gpu"} <= set(report["retrieval"]["latency_ms"])
    assert report["retrieval"]["rows_differing_from_faiss_knn_by_method"]["exact_gpu"] == 0
    scoring = report["scoring"]
    assert "onnxruntime_cuda" in scoring["latency_ms"]
    assert any(name.startswith("onnxruntime_cpu_") for name in scoring["latency_ms"])
    assert "skipped" in scoring["tensorrt"]
    assert set(scoring["batch_sweep"]["requests_per_call"]) == {"1", "2", "4", "8", "16"}
    assert report["in_process"]["provider"] == "CPUExecutionProvider"
    e2e = report["e2e"]
    assert e2e["server_provider"] == "CPUExecutionProvider"
    assert set(e2e["concurrency"]) == {"rest", "grpc"}
    batched = e2e["concurrency_batched"]
    assert set(batched["rest"]) == {"1", "4"} and batched["scorer_batches"]["calls"] > 0
    assert all(m["failures"] == 0 for t in ("rest", "grpc") for m in batched[t].values())
    table = md.read_text()
    for needle in ("retrieval: exact_gpu", "scoring: onnxruntime_cuda", "(scorer micro-batching)",
                   "CUDA call over 16 requests", "skipped: ONNX Runtime does not offer TensorrtExecutionProvider"):
        assert needle in table, needle
