"""`rankserve bench --gpu` (`make bench-gpu`) refuses to run without CUDA, in one line and with a
non-zero exit, and never measures anything on CPU instead.

On a machine without a CUDA device (this one) the refusal is real: the commands are run as a user
runs them. The preflight's reasoning is also checked against probes that pretend each part is
there or missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench_gpu import (
    GpuInfo,
    GpuUnavailable,
    check_sections,
    cuda_devices,
    preflight,
    require_device,
)

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = bool(cuda_devices()[0])
no_cuda_here = pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: the refusal cannot happen")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def refusal_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"one line expected, got:\n{stderr}"
    return lines[0]


@no_cuda_here
def test_bench_gpu_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    out, md = tmp_path / "bench-gpu.json", tmp_path / "bench-gpu.md"
    done = run("-m", "service.cli", "bench", "--gpu", "--out", str(out), "--out-md", str(md))
    assert done.returncode == 2, done
    line = refusal_line(done.stderr)
    assert line.startswith("rankserve bench: error: GPU benchmark refused, nothing measured: no CUDA device"), line
    assert "make bench-gpu" in line
    assert done.stdout == "" and not out.exists() and not md.exists()


@no_cuda_here
def test_device_check_of_make_bench_gpu_refuses_before_installing() -> None:
    done = run("-m", "loadtest.bench_gpu", "--device-only")
    assert done.returncode == 2, done
    assert refusal_line(done.stderr).startswith("GPU benchmark refused, nothing measured: no CUDA device (")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_bench_gpu_checks_the_device_before_the_gpu_extra() -> None:
    """The target's recipe (printed, not run): the device check, then the gpu extra, then the bench with --gpu."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "bench-gpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    device = next(i for i, ln in enumerate(lines) if "loadtest.bench_gpu --device-only" in ln)
    install = next(i for i, ln in enumerate(lines) if "install" in ln and "'.[gpu]'" in ln)
    bench = next(i for i, ln in enumerate(lines) if "service.cli bench --gpu" in ln)
    assert device < install < bench
    assert "--out " in lines[bench] and "--out-md " in lines[bench]


def info(**fields: object) -> GpuInfo:
    found = GpuInfo(devices=["NVIDIA H100 80GB HBM3"], onnxruntime="1.25.1",
                    ort_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                    faiss="1.14.1", faiss_gpu=True, faiss_gpus=1)
    for name, value in fields.items():
        setattr(found, name, value)
    return found


def test_preflight_passes_when_everything_is_there() -> None:
    found = preflight(lambda: info())
    assert found.tensorrt_offered and found.describe()["devices"] == ["NVIDIA H100 80GB HBM3"]


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"devices": [], "driver_error": "cuInit failed: no CUDA-capable device"},
         ["no CUDA device (cuInit failed: no CUDA-capable device)"]),
        ({"ort_providers": ["CPUExecutionProvider"]}, ["onnxruntime 1.25.1 has no CUDAExecutionProvider"]),
        ({"faiss_gpu": False, "faiss_gpus": 0}, ["faiss 1.14.1 has no GPU support"]),
        ({"faiss_gpus": 0}, ["faiss 1.14.1 has GPU support but sees no GPU"]),
        ({"devices": [], "ort_providers": ["CPUExecutionProvider"], "faiss_gpu": False},
         ["no CUDA device", "has no CUDAExecutionProvider", "has no GPU support"]),
    ],
)
def test_preflight_names_everything_missing_in_one_line(fields: dict[str, object], names: list[str]) -> None:
    with pytest.raises(GpuUnavailable) as refused:
        preflight(lambda: info(**fields))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("GPU benchmark refused, nothing measured: ")
    for name in names:
        assert name in message, message
    assert message.count(";") == len(names) - 1


def test_tensorrt_is_optional() -> None:
    found = preflight(lambda: info(ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert not found.tensorrt_offered


def test_device_check_alone() -> None:
    assert require_device(lambda: (["NVIDIA H100"], None)) == ["NVIDIA H100"]
    with pytest.raises(GpuUnavailable, match=r"no CUDA device \(no NVIDIA driver"):
        require_device(lambda: ([], "no NVIDIA driver: libcuda.so.1 cannot be loaded"))


def test_sections_without_a_gpu_variant_are_refused() -> None:
    check_sections({"retrieval", "scoring", "in_process", "transports", "throughput"})
    with pytest.raises(GpuUnavailable, match="strategies, sweeps would run on CPU"):
        check_sections({"retrieval", "strategies", "sweeps"})


def test_cuda_devices_without_a_driver_library() -> None:
    assert cuda_devices("libcuda-that-does-not-exist.so.1") == (
        [], "no NVIDIA driver: libcuda-that-does-not-exist.so.1 cannot be loaded"
    )
