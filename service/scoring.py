"""Scorer runtimes (ONNX Runtime, TorchScript) and additive fusion."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from export.bundle import SCORER_INPUTS, Bundle
from service.errors import BundleRejected

log = logging.getLogger("rankserve.scoring")

F32 = npt.NDArray[np.float32]


class Scorer(Protocol):
    runtime: str
    provider: str

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        """Task probabilities [B, T] for one batch of scorer inputs."""
        ...


class OnnxScorer:
    """ONNX Runtime session; CUDA provider when present and allowed, CPU otherwise."""

    runtime = "onnx"

    def __init__(self, path: Path, threads: int, provider: str = "auto") -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise BundleRejected(f"execution_provider=cuda but ONNX Runtime offers only {available}")
        use_cuda = provider in ("auto", "cuda") and "CUDAExecutionProvider" in available
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad models
            raise BundleRejected(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        self.provider = self._session.get_providers()[0]
        self._names = [i.name for i in self._session.get_inputs()]
        if self._names != list(SCORER_INPUTS):
            raise BundleRejected(f"{path.name} inputs {self._names} differ from {list(SCORER_INPUTS)}")

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        out = self._session.run(None, {name: inputs[name] for name in self._names})[0]
        return np.asarray(out, dtype=np.float32)


class TorchScriptScorer:
    """TorchScript runtime (needs torch installed; never imported unless a bundle asks for it)."""

    runtime = "torchscript"

    def __init__(self, path: Path, threads: int, provider: str = "auto") -> None:
        try:
            import torch
        except ImportError as exc:
            raise BundleRejected("scorer_runtime=torchscript needs torch (install the train extra)") from exc
        torch.set_num_threads(threads)
        self._torch = torch
        self._device = "cuda" if provider in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.provider = self._device
        self._module = torch.jit.load(str(path), map_location=self._device)  # type: ignore[no-untyped-call]
        self._module.eval()

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.asarray(inputs[n])).to(self._device) for n in SCORER_INPUTS]
            return np.asarray(self._module(*args).cpu().numpy(), dtype=np.float32)


def make_scorer(bundle: Bundle, runtime: str, threads: int, provider: str) -> Scorer:
    """The scorer of `bundle` in `runtime`; "bundle" takes the runtime the bundle was exported for."""
    if runtime == "bundle":
        runtime = bundle.scorer_runtime
    if runtime == "onnx":
        return OnnxScorer(bundle.scorer_path("onnx"), threads, provider)
    if runtime == "torchscript":
        return TorchScriptScorer(bundle.scorer_path("torchscript"), threads, provider)
    raise BundleRejected(f"unknown scorer runtime {runtime!r}")


TRANSFORMS = ("identity", "log", "power")


class Fusion:
    """Additive fusion s = Σ_t w_t·f_t(p_t), f_t in {identity, log, power:<exponent>}."""

    def __init__(self, tasks: list[str], weights: Mapping[str, float], transforms: Mapping[str, str]) -> None:
        unknown = (set(weights) | set(transforms)) - set(tasks)
        if unknown:
            raise ValueError(f"fusion names tasks {sorted(unknown)} that the model does not predict ({tasks})")
        self.tasks = tasks
        self.weights = np.array([float(weights.get(t, 0.0)) for t in tasks], dtype=np.float64)
        self.transforms = [transforms.get(t, "identity") for t in tasks]
        for t, spec in zip(tasks, self.transforms, strict=True):
            kind, _, arg = spec.partition(":")
            if kind not in TRANSFORMS or (kind == "power" and not _is_float(arg)) or (kind != "power" and arg):
                raise ValueError(f"transform of {t!r} must be identity, log or power:<exponent>, got {spec!r}")

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, weights: Mapping[str, float] | None = None, transforms: Mapping[str, str] | None = None
    ) -> Fusion:
        fusion = bundle.fusion
        return cls(bundle.tasks, weights or fusion["weights"], transforms or fusion.get("transforms", {}))

    def describe(self) -> dict[str, Any]:
        return {
            "weights": dict(zip(self.tasks, self.weights.tolist(), strict=True)),
            "transforms": dict(zip(self.tasks, self.transforms, strict=True)),
        }

    def __call__(self, probs: F32) -> npt.NDArray[np.float64]:
        p = probs.astype(np.float64)
        score = np.zeros(p.shape[0], dtype=np.float64)
        for t, spec in enumerate(self.transforms):
            kind, _, arg = spec.partition(":")
            col = p[:, t]
            if kind == "log":
                col = np.log(np.maximum(col, 1e-12))
            elif kind == "power":
                col = np.power(col, float(arg))
            score += self.weights[t] * col
        return score


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
