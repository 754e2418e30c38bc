"""Additive fusion of the task scores into one ranking score: s = Σ_t w_t·f_t(p_t).

It lives beside the schema because training (evaluation of the fused ranking) and serving must
fuse identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


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
            if not is_transform(spec):
                raise ValueError(f"transform of {t!r} must be identity, log or power:<exponent>, got {spec!r}")

    @classmethod
    def from_declared(
        cls,
        tasks: list[str],
        declared: Mapping[str, Any],
        weights: Mapping[str, float] | None = None,
        transforms: Mapping[str, str] | None = None,
    ) -> Fusion:
        """The fusion a bundle or spec declares (`{"weights": ..., "transforms": ...}`), with overrides."""
        return cls(tasks, weights or declared["weights"], transforms or declared.get("transforms", {}))

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


def is_transform(spec: str) -> bool:
    """identity, log, or power:<finite exponent>."""
    kind, _, arg = spec.partition(":")
    if kind != "power":
        return kind in TRANSFORMS and not arg
    try:
        return math.isfinite(float(arg))
    except ValueError:
        return False
