"""Int8 bundles: the ONNX scorer's dense layers quantized, held to their stated tolerance, served as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.bundle import open_bundle
from export.exporter import write_bundle
from export.parity import PARITY_TOLERANCE, parity_batch
from export.quantize import QUANTIZED_PARITY_TOLERANCE
from feature_store.schema import FeatureSchema
from models.model import RankingModel
from service.errors import BundleRejected
from service.registry import ModelRegistry
from service.retrieval import make_retriever
from service.scoring import make_scorer
from service.settings import Settings
from service.transports.rest.schemas import ModelInfo
from tests.helpers import side_schema, tiny_model, tiny_schema


def _export(schema: FeatureSchema, root: Path, quantize: str | None) -> tuple[RankingModel, Path]:
    model = tiny_model(schema)
    schema.save(root / "schema")
    return model, write_bundle(model, root / "schema", {"variant": "twin"}, root / "models", "q", quantize=quantize)


@pytest.mark.parametrize("make_schema", [tiny_schema, side_schema], ids=["base", "side-features"])
def test_an_int8_bundle_is_quantized_and_within_its_tolerance(make_schema: object, tmp_path: Path) -> None:
    schema = make_schema()  # type: ignore[operator]
    model, path = _export(schema, tmp_path, "int8")
    bundle = open_bundle(path)
    assert bundle.scorer_quantization == "int8" and bundle.describe()["scorer_quantization"] == "int8"
    parity = bundle.manifest["parity"]
    assert parity["passed"] and parity["tolerance"] == {"onnx": QUANTIZED_PARITY_TOLERANCE,
                                                         "torchscript": PARITY_TOLERANCE}
    # TorchScript stays float: bit-close to the model; ONNX is quantized: close, not equal
    assert max(parity["per_task"]["torchscript"].values()) <= PARITY_TOLERANCE
    assert 0 < max(parity["per_task"]["onnx"].values()) <= QUANTIZED_PARITY_TOLERANCE

    graph = onnx.load(str(path / "scorer.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "DynamicQuantizeLinear" in ops and ops.count("MatMulInteger") >= 3  # every tower's layers
    assert "Gemm" not in ops
    if schema.spec.side.n_values:  # the numeric bucket embedding's 3-D weight stays float
        assert any(n.op_type == "MatMul" for n in graph.node)
    assert not any(p.name.startswith(".float") for p in path.iterdir())  # the float graph was not left behind

    # the service's scorer runs the quantized graph as it is
    scorer = make_scorer(bundle, "onnx", threads=1, provider="cpu")
    inputs = parity_batch(model, schema.spec, seed=5, batch_size=32)
    names = schema.spec.scorer_inputs
    with torch.no_grad():
        expected = model.scorer(*(inputs[n] for n in names)).numpy()
    served = scorer.predict({n: inputs[n].numpy() for n in names})
    assert served.shape == expected.shape and np.all(np.isfinite(served))
    assert float(np.abs(served - expected).max()) <= QUANTIZED_PARITY_TOLERANCE


def test_a_float_bundle_says_it_is_not_quantized(tmp_path: Path) -> None:
    _model, path = _export(tiny_schema(), tmp_path, None)
    bundle = open_bundle(path)
    assert bundle.scorer_quantization is None
    assert bundle.manifest["parity"]["tolerance"]["onnx"] == PARITY_TOLERANCE
    assert "MatMulInteger" not in {n.op_type for n in onnx.load(str(path / "scorer.onnx")).graph.node}


def test_an_unknown_quantization_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize must be one of"):
        _export(tiny_schema(), tmp_path, "int4")
    assert not (tmp_path / "models" / "q").exists() or not any((tmp_path / "models" / "q").iterdir())


def _registry(model_dir: Path, **settings: object) -> ModelRegistry:
    config = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0, retrieval_strategy="exact",
                      **settings)  # type: ignore[arg-type]
    return ModelRegistry(config, lambda: make_retriever("exact"), schema_hash=lambda: None)


def test_the_service_says_which_scorer_is_quantized(tmp_path: Path) -> None:
    _model, path = _export(tiny_schema(), tmp_path, "int8")
    onnx_info = ModelInfo.from_describe("q/1", _registry(path.parent.parent).load(path).describe())
    assert (onnx_info.runtime, onnx_info.scorer_runtime, onnx_info.scorer_quantization) == ("onnx", "onnx", "int8")
    # the same bundle scored by its TorchScript scorer runs float
    scripted = _registry(path.parent.parent, scorer_runtime="torchscript").load(path).describe()
    assert (scripted["runtime"], scripted["scorer_quantization"]) == ("torchscript", None)


def test_an_int8_bundle_is_refused_with_micro_batching(tmp_path: Path) -> None:
    """Dynamic quantization scales by the whole batch: batched with other requests, a request's scores would move."""
    model, path = _export(tiny_schema(), tmp_path, "int8")
    inputs = parity_batch(model, tiny_schema().spec, seed=3, batch_size=32)
    scorer = make_scorer(open_bundle(path), "onnx", threads=1, provider="cpu")
    feeds = {n: inputs[n].numpy() for n in tiny_schema().spec.scorer_inputs}
    alone = scorer.predict({n: a[:8] for n, a in feeds.items()})
    assert not np.array_equal(alone, scorer.predict(feeds)[:8])  # what the refusal protects against
    with pytest.raises(BundleRejected, match="RANKSERVE_SCORER_BATCH_WAIT_MS=0"):
        _registry(path.parent.parent, scorer_batch_wait_ms=2.0).load(path)
    # a float bundle is batch-independent and keeps loading with micro-batching on
    _model, float_path = _export(tiny_schema(), tmp_path / "float", None)
    assert _registry(float_path.parent.parent, scorer_batch_wait_ms=2.0).load(float_path).describe()[
        "scorer_quantization"] is None
