"""Scorer runtimes: ONNX Runtime (CUDA when present) and TorchScript, behind one `Scorer` protocol.

A scorer's inputs are its bundle schema's `scorer_inputs` (the base ones, then `side_ids` and
`side_values` when the schema has side features), in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from export.bundle import Bundle
from feature_store.schema import SCORER_INPUTS
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

    def __init__(
        self, path: Path, threads: int, provider: str = "auto", inputs: Sequence[str] = SCORER_INPUTS
    ) -> None:
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
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            # offered but not usable (e.g. CUDA or cuDNN libraries missing): ONNX Runtime fell back to CPU
            raise BundleRejected(f"execution_provider=cuda but ONNX Runtime could not start CUDAExecutionProvider "
                                 f"for {path.name} (the session runs on {self.provider}); see its log for the reason")
        self._names = [i.name for i in self._session.get_inputs()]
        if self._names != list(inputs):
            raise BundleRejected(f"{path.name} inputs {self._names} differ from the schema's scorer inputs "
                                 f"{list(inputs)}")

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        feed = {name: inputs[name] for name in self._names}
        if self._names and feed[self._names[0]].shape[0] == 1:
            # ONNX Runtime computes a one-row batch with other kernels (matrix-vector) than the same row
            # in a larger batch, and the last bits differ: scored as two identical rows, a candidate's
            # scores do not depend on the batch it is scored in (service/batching.py concatenates requests)
            feed = {name: np.concatenate([a, a], axis=0) for name, a in feed.items()}
            return np.asarray(self._session.run(None, feed)[0][:1], dtype=np.float32)
        out = self._session.run(None, feed)[0]
        return np.asarray(out, dtype=np.float32)


class TorchScriptScorer:
    """TorchScript runtime (needs torch installed; never imported unless a bundle asks for it)."""

    runtime = "torchscript"

    def __init__(
        self, path: Path, threads: int, provider: str = "auto", inputs: Sequence[str] = SCORER_INPUTS
    ) -> None:
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
        self._names = tuple(inputs)

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.asarray(inputs[n])).to(self._device) for n in self._names]
            return np.asarray(self._module(*args).cpu().numpy(), dtype=np.float32)


def resolve_runtime(bundle: Bundle, runtime: str) -> str:
    """The runtime a setting of `runtime` scores `bundle` with: "bundle" is the one it was exported for."""
    return bundle.scorer_runtime if runtime == "bundle" else runtime


def make_scorer(bundle: Bundle, runtime: str, threads: int, provider: str) -> Scorer:
    """The scorer of `bundle` in `runtime` (`resolve_runtime`)."""
    runtime = resolve_runtime(bundle, runtime)
    inputs = bundle.schema.spec.scorer_inputs
    if runtime == "onnx":
        return OnnxScorer(bundle.scorer_path("onnx"), threads, provider, inputs)
    if runtime == "torchscript":
        return TorchScriptScorer(bundle.scorer_path("torchscript"), threads, provider, inputs)
    raise BundleRejected(f"unknown scorer runtime {runtime!r}")
