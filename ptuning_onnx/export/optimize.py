"""Optional post-export passes: portable graph optimization, dynamic int8 and weight-only int4 quantization.

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


def optimize_graph(path: Path, *, fuse: bool = True, quantize: Optional[str] = None,
                   external_data: Optional[bool] = None) -> None:
    if fuse:
        _basic_optimize(path)
    if quantize == "int8":
        _quantize_int8(path, external_data)
    elif quantize == "int4":
        _quantize_int4(path, external_data)


def _basic_optimize(path: Path) -> None:
    """onnxruntime's BASIC level (constant folding, redundant-node elimination): provider-independent, so the
    saved graph runs on CPU and CUDA alike. Higher levels may emit CPU-only fused ops."""
    import onnxruntime as ort

    tmp = path.with_name(path.stem + ".opt.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    if graph_io.is_external(path):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         graph_io.data_name(tmp))
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(graph_io.SIZE_THRESHOLD))
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime could not optimize {path.name}: {exc}") from exc
    _check_inputs_kept(path, tmp)
    graph_io.move(tmp, path)


def _check_inputs_kept(original: Path, optimized: Path) -> None:
    """Constant folding may bake an optional input's default in and drop the input: refuse such a graph."""
    before = graph_io.load(original, data=False)
    after = graph_io.load(optimized, data=False)
    names = {i.name for i in after.graph.input}
    lost = [i.name for i in before.graph.input if i.name not in names]
    if lost:
        raise ExportError(f"optimization removed graph inputs {lost}")


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
