"""Optional post-export passes: portable graph optimization and dynamic int8 weight quantization.

Both rewrite the graph in place; parity then runs on the rewritten graph, so an optimization that changes results
fails the export like any other mismatch. Transformer-specific fusions (attention, skip-layer-norm) and int4/fp16
kernels belong to the performance work that follows; this module is where they will go.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExportError


def optimize_graph(path: Path, ref, *, fuse: bool = True, quantize: str | None = None) -> None:
    if fuse:
        _basic_optimize(path)
    if quantize == "int8":
        _quantize_int8(path)


def _basic_optimize(path: Path) -> None:
    """onnxruntime's BASIC level (constant folding, redundant-node elimination): provider-independent, so the
    saved graph runs on CPU and CUDA alike. Higher levels may emit CPU-only fused ops."""
    import onnxruntime as ort

    tmp = path.with_suffix(".opt.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime could not optimize {path.name}: {exc}") from exc
    _restore_defaults(path, tmp)
    os.replace(tmp, path)


def _restore_defaults(original: Path, optimized: Path) -> None:
    """Constant folding may bake an optional input's default in and drop the input; put the input back."""
    import onnx

    before = onnx.load(str(original), load_external_data=False)
    after = onnx.load(str(optimized))
    names = {i.name for i in after.graph.input}
    lost = [i for i in before.graph.input if i.name not in names]
    if lost:
        raise ExportError(f"optimization removed graph inputs {[i.name for i in lost]}")


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    except Exception as exc:
        raise ExportError(f"int8 quantization of {path.name} failed: {exc}") from exc
    os.replace(tmp, path)
