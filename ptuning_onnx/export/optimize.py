"""Quantization passes: dynamic int8 and weight-only int4 (``--optimize``'s fusions are in fusion.py).

Each rewrites the graph in place, external data included (graph_io); parity then runs on the rewritten graph, so
a pass that changes results fails the export like any other mismatch. Each pass holds the graph in memory once:
int4 quantizes weight by weight inside the loaded graph and drops each fp32 weight as it is replaced.
"""

from __future__ import annotations

import os
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
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    external = graph_io.is_external(path)
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=external)
    except Exception as exc:
        raise ExportError(f"int8 quantization of {path.name} failed: {type(exc).__name__}: {exc}") from exc
    # onnxruntime names its data file after its own output; bring it to the folder's form.
    if external or graph_io.is_external(tmp):
        model = graph_io.load(tmp)
        for name in (tmp, tmp.parent / graph_io.data_name(tmp)):
            if name.exists():
                name.unlink()
        graph_io.save(model, path, external=external_data)
    else:
        os.replace(tmp, path)


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
