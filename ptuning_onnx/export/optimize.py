"""Quantization passes: dynamic int8 and weight-only int4 (``--optimize``'s fusions are in fusion.py).

Each rewrites the graph in place, external data included (graph_io); parity then runs on the rewritten graph, so
a pass that changes results fails the export like any other mismatch. Each pass holds the graph in memory once:
int4 quantizes weight by weight inside the loaded graph and drops each fp32 weight as it is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import ExportError
from . import graph_io

# int4: onnxruntime's MatMulNBits, 32 weights per block with one fp32 scale (what onnxruntime-genai's builder
# writes), symmetric. accuracy_level 4 lets the CPU kernel quantize activations to int8 and use its int8 dot
# product path, the fastest int4 path on x86 and ARM; CUDA ignores it.
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def quantize_graph(path: Path, quantize: str, *, external_data: Optional[bool] = None) -> None:
    if quantize == "int8":
        _quantize_int8(path, external_data)
    elif quantize == "int4":
        _quantize_int4(path, external_data)
    else:
        raise ExportError(f"unknown quantization {quantize!r}")


def _quantize_int8(path: Path, external_data: Optional[bool]) -> None:
    """Dynamic int8: every MatMul/Gemm with a constant weight gets int8 weights (one scale per tensor) and int8
    activations quantized at run time. onnxruntime's ``quantize_dynamic`` with the graph loaded once: its own
    loader adds a shape-inferred copy, which on a 1.1B model put the export over 3x the fp32 weights."""
    import logging

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, update_opset_version

    model = update_opset_version(graph_io.load(path), QuantType.QInt8)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing" advice meant for static quantization
    try:
        quantizer = ONNXQuantizer(model, False, False, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                                  QuantType.QUInt8, None, [], [], ["MatMul", "Gemm"], {"MatMulConstBOnly": True})
        quantizer.quantize_model()
    except Exception as exc:
        raise ExportError(f"int8 quantization of {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    del model
    graph_io.save(quantizer.model.model, path, external=external_data)


def _quantize_int4(path: Path, external_data: Optional[bool]) -> None:
    """Every MatMul with a constant 2-D weight (attention, MLP and the lm_head) becomes a MatMulNBits."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = graph_io.load(path)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                          accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs one INFO line per weight
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    except Exception as exc:
        raise ExportError(f"int4 quantization of {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    del model
    quantized = quantizer.model.model
    if not any(node.op_type == "MatMulNBits" for node in quantized.graph.node):
        raise ExportError(f"int4 quantization of {path.name} found no MatMul with a constant weight to quantize")
    graph_io.save(quantized, path, external=external_data)
