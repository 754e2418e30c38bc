"""Int8 scorers: ONNX Runtime's dynamic quantization of the exported float graph.

About two thirds of the scorer's time on CPU is its dense layers (the towers' Gemm nodes), which
run at about the core's float32 peak already; with int8 weights and activations quantized per
call (`quantize_dynamic`) they run on the integer units. Weights are quantized per output channel:
with one scale per tensor, a layer whose columns differ in range loses its small columns. Only
layers with a 2-D weight are quantized (ONNX Runtime's integer MatMul takes per-channel scales
of a matrix only; the numeric side features' bucket embedding is a 3-D MatMul and stays float).

A call's inputs are quantized with one scale per tensor, taken from the whole batch, so a
candidate's probabilities depend slightly on the other rows scored with it (by up to ~3e-3 on
the standard workload). The service therefore refuses an int8 bundle when micro-batching would
mix requests in one call, and an int8 shadow, which scores in chunks, differs from the same
bundle as primary by about as much.

A quantized scorer is no longer the model bit for bit: the bundle states its parity tolerance
(`QUANTIZED_PARITY_TOLERANCE`, on probabilities) and the export refuses one outside it. Its
ranking quality is measured against the float graph on held-out data with
`python -m loadtest.eval_strategies --scorers torch,onnx,onnx-int8`.
"""

from __future__ import annotations

import logging
from pathlib import Path

QUANTIZATIONS = ("int8",)
# the largest |Δp| a quantized scorer may differ from the PyTorch model on the parity batches; a
# gross-error gate (a layer quantized wrongly moves probabilities by far more), not a quality
# bound: on held-out data the largest |Δp| measured was 0.031 (Tmall) and 0.064 (synthetic set),
# with every task's AUC within 0.0003 of the float graph's
QUANTIZED_PARITY_TOLERANCE = 1e-1
_DENSE_OPS = ("MatMul", "Gemm")


def quantize_scorer(float_path: Path, out_path: Path) -> list[str]:
    """Write `float_path`'s graph with int8 dense layers to `out_path`; return the quantized node names."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(float_path)).graph
    weights = {t.name: len(t.dims) for t in graph.initializer}
    dense = [n for n in graph.node if n.op_type in _DENSE_OPS]
    matrix = [n.name for n in dense if any(weights.get(x) == 2 for x in n.input)]
    others = [n.name for n in dense if n.name not in matrix]
    # the quantizer advises shape pre-processing on the root logger: that pass is for graphs of
    # unknown shapes (convolutions); this graph's dense layers have static weight shapes already
    root = logging.getLogger()
    quiet = _DropPreProcessAdvice()
    root.addFilter(quiet)
    try:
        quantize_dynamic(float_path, out_path, op_types_to_quantize=list(_DENSE_OPS), nodes_to_exclude=others,
                         per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(quiet)
    return matrix


class _DropPreProcessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
