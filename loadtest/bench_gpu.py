"""`rankserve bench --gpu`: the GPU paths of the standard workload, and the preflight that guards them.

`make bench-gpu` installs the `gpu` extra (onnxruntime-gpu, faiss-gpu-cu12) and runs
`rankserve bench --gpu`. Before anything is built, `preflight()` checks the three things a GPU run
needs and refuses, in one line and with a non-zero exit, when any is missing:

* a CUDA device the NVIDIA driver sees (`libcuda.so.1`: cuInit, cuDeviceGetCount);
* ONNX Runtime offering `CUDAExecutionProvider` (onnxruntime-gpu, not the CPU wheel);
* faiss with GPU support that sees that device (faiss-gpu-cu12, not faiss-cpu).

Nothing falls back to CPU silently: every GPU path is also checked once built (the scorer session
runs on CUDA, the retrievers on the GPU, the servers report the CUDA provider) and a path that
ended up on CPU stops the run with the same kind of one-line error. The TensorRT provider is
measured when ONNX Runtime offers it and it starts; otherwise the report says why it was skipped.

Sections in GPU mode: `retrieval` (faiss GPU brute force and the exact strategy on GPU beside the
CPU methods), `scoring` (ONNX Runtime CUDA and TensorRT, TorchScript on CUDA, the CPU session for
reference, and one CUDA call over 1..16 concatenated requests: what micro-batching buys),
`in_process` (`RankingService.rank` with the CUDA provider and GPU retrieval) and `transports` /
`throughput` (REST and gRPC against servers started with the GPU settings; with
`--gpu-batch-wait-ms` > 0 the transports run a second time with scorer micro-batching on).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_store.errors import UserError

# the settings every GPU server and in-process core runs with (service/settings.py)
GPU_SETTINGS = {"execution_provider": "cuda", "retrieval_device": "gpu"}
GPU_SERVER_ENV = {"RANKSERVE_EXECUTION_PROVIDER": "cuda", "RANKSERVE_RETRIEVAL_DEVICE": "gpu"}
GPU_SECTIONS = ("retrieval", "scoring", "in_process", "transports", "throughput")
GPU_DEFAULT_SECTIONS = ("retrieval", "scoring", "in_process", "transports")
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
BATCH_SWEEP = (1, 2, 4, 8, 16)


class GpuUnavailable(UserError):
    """A GPU run cannot start (or a GPU path ended up on CPU): the message says what is missing, in one line."""


@dataclass
class GpuInfo:
    """What the preflight found (recorded in the report)."""

    devices: list[str] = field(default_factory=list)
    driver_error: str | None = None
    onnxruntime: str = "not installed"
    ort_providers: list[str] = field(default_factory=list)
    faiss: str = "not installed"
    faiss_gpu: bool = False
    faiss_gpus: int = 0

    @property
    def tensorrt_offered(self) -> bool:
        return TENSORRT_PROVIDER in self.ort_providers

    def problems(self) -> list[str]:
        out = []
        if not self.devices:
            out.append(f"no CUDA device ({self.driver_error or 'the NVIDIA driver sees none'})")
        if CUDA_PROVIDER not in self.ort_providers:
            offered = ", ".join(self.ort_providers) or "none"
            out.append(f"onnxruntime {self.onnxruntime} has no {CUDA_PROVIDER} (it offers {offered}: "
                       "the CPU wheel, not onnxruntime-gpu)")
        if not self.faiss_gpu:
            out.append(f"faiss {self.faiss} has no GPU support (faiss-cpu, not faiss-gpu-cu12)")
        elif self.devices and self.faiss_gpus == 0:
            out.append(f"faiss {self.faiss} has GPU support but sees no GPU (faiss.get_num_gpus() == 0: "
                       "built for another CUDA than the driver's?)")
        return out

    def describe(self) -> dict[str, Any]:
        return {"devices": self.devices, "onnxruntime": self.onnxruntime, "ort_providers": self.ort_providers,
                "faiss": self.faiss, "faiss_gpus": self.faiss_gpus, "tensorrt_offered": self.tensorrt_offered}


def cuda_devices(library: str = "libcuda.so.1") -> tuple[list[str], str | None]:
    """The names of the CUDA devices the driver sees, and why there are none (None when there are some)."""
    try:
        cuda = ctypes.CDLL(library)
    except OSError:
        return [], f"no NVIDIA driver: {library} cannot be loaded"
    rc = cuda.cuInit(0)
    if rc != 0:
        reason = "no CUDA-capable device" if rc == 100 else f"CUDA error {rc}"
        return [], f"cuInit failed: {reason}"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return [], f"cuDeviceGetCount failed: CUDA error {rc}"
    names = []
    for ordinal in range(count.value):
        device = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0 and cuda.cuDeviceGetName(buf, 256, device) == 0:
            names.append(buf.value.decode(errors="replace"))
        else:
            names.append(f"cuda:{ordinal}")
    return names, None if names else "the NVIDIA driver sees no CUDA device"


def gpu_info(devices: Callable[[], tuple[list[str], str | None]] = cuda_devices) -> GpuInfo:
    """Probe the driver, ONNX Runtime and faiss (imports both, starts nothing on the GPU but cuInit)."""
    info = GpuInfo()
    info.devices, info.driver_error = devices()
    try:
        import onnxruntime as ort

        info.onnxruntime = ort.__version__
        info.ort_providers = list(ort.get_available_providers())
    except ImportError:
        pass
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines would bury the refusal
    try:
        import faiss

        info.faiss = getattr(faiss, "__version__", "unknown")
        info.faiss_gpu = hasattr(faiss, "knn_gpu") and hasattr(faiss, "StandardGpuResources")
        if info.faiss_gpu and info.devices:
            info.faiss_gpus = int(faiss.get_num_gpus())
    except ImportError:
        pass
    return info


def refusal(problems: list[str]) -> str:
    return ("GPU benchmark refused, nothing measured: " + "; ".join(problems)
            + ". It needs an NVIDIA GPU with its driver, onnxruntime-gpu and faiss-gpu-cu12 "
            "(`make bench-gpu` installs the gpu extra)")


def preflight(probe: Callable[[], GpuInfo] = gpu_info) -> GpuInfo:
    """What the GPU run will use; raises GpuUnavailable naming everything that is missing."""
    info = probe()
    problems = info.problems()
    if problems:
        raise GpuUnavailable(refusal(problems))
    return info


def require_device(devices: Callable[[], tuple[list[str], str | None]] = cuda_devices) -> list[str]:
    """The CUDA devices; GpuUnavailable when there is none (`make bench-gpu` asks before installing the extra)."""
    names, error = devices()
    if not names:
        raise GpuUnavailable(refusal([f"no CUDA device ({error or 'the NVIDIA driver sees none'})"]))
    return names


def require(condition: bool, what: str) -> None:
    """Stop the run (no silent CPU fallback) when a GPU path did not end up on the GPU."""
    if not condition:
        raise GpuUnavailable(f"GPU benchmark stopped: {what}")


def check_sections(sections: set[str]) -> None:
    other = sorted(sections - set(GPU_SECTIONS))
    if other:
        raise GpuUnavailable(f"--gpu measures only {', '.join(GPU_SECTIONS)}; {', '.join(other)} "
                             "would run on CPU: leave them out of --sections")


# ---------------------------------------------------------------------------------------------
# the measurements


def gpu_retrievers() -> dict[str, Any]:
    """faiss GPU brute force and the exact strategy on GPU, checked to be on the GPU."""
    from service.retrieval import make_retriever

    exact = make_retriever("exact", device="gpu")
    require(getattr(exact, "device", None) == "gpu", "make_retriever('exact', device='gpu') is not on the GPU")
    return {"faiss_gpu": make_retriever("faiss_gpu"), "exact_gpu": exact}


def ort_gpu_session(path: Path, provider: str, cache_dir: Path | None = None) -> Any:
    """An ONNX Runtime session on `provider` (CUDA or TensorRT, with CUDA under TensorRT for what it cannot run).

    Raises GpuUnavailable when the session does not run on `provider` (ONNX Runtime falls back quietly).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list[Any]
    if provider == TENSORRT_PROVIDER:
        trt: dict[str, Any] = {"trt_fp16_enable": False}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
        providers = [(TENSORRT_PROVIDER, trt), CUDA_PROVIDER]
    else:
        providers = [CUDA_PROVIDER]
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    require(session.get_providers()[0] == provider,
            f"ONNX Runtime could not start {provider} (the session runs on {session.get_providers()})")
    return session


def section_scoring_gpu(model: Any, bundle_path: Path, store_fetch: Callable[[int, list[int]], Any],
                        reqs: list[tuple[int, list[int]]], w: Any, threads: int, root: Path) -> dict[str, Any]:
    """ONNX Runtime CUDA (and TensorRT when offered) vs TorchScript on CUDA vs the CPU session; the batch sweep."""
    import onnxruntime as ort

    from loadtest.bench import interleaved, ort_session, percentiles

    batches = []
    for user, cands in reqs[:16]:
        res = store_fetch(user, cands)
        batches.append(model.inputs(res.sequence.before(w.request_time), res.user_index or 0, res.item_index,
                                    res.category_index, w.request_time))
    names = tuple(model.spec.scorer_inputs)  # the bundle's own inputs (side features included)
    feeds = [{n: b[n] for n in names} for b in batches]
    onnx = bundle_path / "scorer.onnx"
    sessions: dict[str, Any] = {"onnxruntime_cuda": ort_gpu_session(onnx, CUDA_PROVIDER),
                                f"onnxruntime_cpu_{threads}t": ort_session(onnx, threads, False)}
    tensorrt: dict[str, Any] = {"offered": TENSORRT_PROVIDER in ort.get_available_providers()}
    if tensorrt["offered"]:
        try:
            t0 = time.perf_counter()
            sessions["onnxruntime_tensorrt"] = ort_gpu_session(onnx, TENSORRT_PROVIDER, root / "trt-cache")
            sessions["onnxruntime_tensorrt"].run(None, feeds[0])  # builds the engine
            tensorrt["engine_build_s"] = round(time.perf_counter() - t0, 1)
        except Exception as exc:  # TensorRT libraries missing or the graph unsupported: reported, not fatal
            tensorrt["skipped"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    else:
        tensorrt["skipped"] = "ONNX Runtime does not offer TensorrtExecutionProvider"

    def runs(session: Any) -> Callable[[int], object]:
        def call(i: int) -> object:
            return session.run(None, feeds[i % len(feeds)])

        return call

    methods: dict[str, Callable[[int], object]] = {name: runs(sess) for name, sess in sessions.items()}
    torch_cuda = _torchscript_cuda(bundle_path, names)
    if torch_cuda is not None:

        def run_torchscript(i: int) -> object:
            return torch_cuda.predict(batches[i % len(batches)])

        methods["torchscript_cuda"] = run_torchscript
    reference = sessions[f"onnxruntime_cpu_{threads}t"].run(None, feeds[0])[0]
    diffs = {name: float(np.abs(sess.run(None, feeds[0])[0] - reference).max()) for name, sess in sessions.items()}
    if torch_cuda is not None:
        diffs["torchscript_cuda"] = float(np.abs(torch_cuda.predict(batches[0]) - reference).max())
    times = interleaved(methods, w.iterations, w.warmup)
    stats = {name: percentiles(v) for name, v in times.items()}
    return {
        "batch": w.candidates,
        "latency_ms": stats,
        "cuda_speedup_vs_cpu_p50": round(stats[f"onnxruntime_cpu_{threads}t"]["p50"]
                                         / stats["onnxruntime_cuda"]["p50"], 2),
        "max_abs_diff_vs_cpu": diffs,
        "tensorrt": tensorrt,
        "torchscript_cuda": torch_cuda is not None,
        "batch_sweep": batch_sweep(sessions["onnxruntime_cuda"], feeds, w),
    }


def _torchscript_cuda(bundle_path: Path, names: Sequence[str]) -> Any:
    """The TorchScript scorer on CUDA when torch sees CUDA (torch's own wheel decides), else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from service.scoring import TorchScriptScorer

    scorer = TorchScriptScorer(bundle_path / "scorer.torchscript.pt", 1, "cuda", names)
    require(scorer.provider == "cuda", "the TorchScript scorer did not load on CUDA")
    return scorer


def concatenated(feeds: Sequence[Mapping[str, np.ndarray]], m: int, start: int) -> dict[str, np.ndarray]:
    """The inputs of `m` requests (from `start`, cyclic) concatenated along the candidate axis."""
    picked = [feeds[(start + j) % len(feeds)] for j in range(m)]
    return {n: np.concatenate([f[n] for f in picked], axis=0) for n in picked[0]}


def batch_sweep(session: Any, feeds: Sequence[Mapping[str, np.ndarray]], w: Any) -> dict[str, Any]:
    """One CUDA call over m concatenated requests (what the scorer micro-batching does): ms per call and per request.

    Requests whose inputs differ in trailing shape cannot be concatenated; the sweep uses those that can.
    """
    from loadtest.bench import percentiles
    from service.batching import input_signature

    first = input_signature(feeds[0])[1]
    same = [f for f in feeds if input_signature(f)[1] == first]
    out: dict[str, Any] = {"requests_per_call": {}, "candidates_per_request": w.candidates}
    for m in BATCH_SWEEP:
        feed = concatenated(same, m, 0)
        for _ in range(max(3, w.warmup // 2)):
            session.run(None, feed)
        samples = []
        for _ in range(max(10, w.iterations // 4)):
            t0 = time.perf_counter()
            session.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1000)
        p = percentiles(samples)
        out["requests_per_call"][str(m)] = {"call_ms": p, "ms_per_request_p50": round(p["p50"] / m, 3)}
    return out


def check_inprocess(core: Any) -> dict[str, str]:
    """The in-process core's model scores on CUDA and retrieves on the GPU; what it reports."""
    model = core.registry.require()
    provider = model.scorer.provider
    device = getattr(model.retriever, "device", None)
    require(provider == CUDA_PROVIDER, f"the in-process scorer runs on {provider}, not {CUDA_PROVIDER}")
    require(device == "gpu", f"the in-process retriever {type(model.retriever).__name__} runs on {device}, not gpu")
    return {"provider": provider, "retrieval_device": str(device)}


def check_server(base_url: str) -> str:
    """The provider a running server's model scores with (GET /v1/models), which must be CUDA."""
    import httpx

    current = httpx.get(base_url + "/v1/models", timeout=10.0).json().get("current") or {}
    provider = str(current.get("provider"))
    require(provider == CUDA_PROVIDER, f"the server's model scores on {provider}, not {CUDA_PROVIDER}")
    return provider


def markdown_rows(report: Mapping[str, Any]) -> list[str]:
    """Rows of the GPU-only measurements (the shared sections print their own)."""
    lines = []
    g = report.get("gpu") or {}
    if g:
        lines.append(f"| GPU | | | {', '.join(g.get('devices', []))}; onnxruntime {g.get('onnxruntime')}, "
                     f"faiss {g.get('faiss')} |")
    r = report.get("retrieval") or {}
    for name, speedup in r.get("speedup_vs_faiss_knn_p50_by_method", {}).items():
        differ = r.get("rows_differing_from_faiss_knn_by_method", {}).get(name)
        lines.append(f"| retrieval {name} vs faiss.knn (CPU, p50) | | | {speedup}x, "
                     f"{differ}/{r.get('rows_compared')} rows differ |")
    s = report.get("scoring") or {}
    if "cuda_speedup_vs_cpu_p50" in s:
        lines.append(f"| ONNX CUDA speedup vs CPU (p50) | | | {s['cuda_speedup_vs_cpu_p50']}x |")
        if "skipped" in s.get("tensorrt", {}):
            lines.append(f"| scoring: onnxruntime_tensorrt | | | skipped: {s['tensorrt']['skipped']} |")
        for m, v in s.get("batch_sweep", {}).get("requests_per_call", {}).items():
            lines.append(f"| CUDA call over {m} requests | {v['call_ms']['p50']} | {v['call_ms']['p99']} | "
                         f"{v['ms_per_request_p50']} ms per request (p50) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.bench_gpu [--device-only]`: the preflight alone (JSON, or one line and exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_gpu", description=main.__doc__)
    parser.add_argument("--device-only", action="store_true",
                        help="check only for a CUDA device (before the gpu extra is installed)")
    args = parser.parse_args(argv)
    try:
        found: Any = {"devices": require_device()} if args.device_only else preflight().describe()
    except GpuUnavailable as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write(json.dumps(found) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
