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
# Larger blocks store fewer scales (block 128: 4.25 bits a weight instead of 5) and run faster on the CPU, for a
# larger quantization error, which the quantized gate measures: --int4-block-size.
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def quantize_graph(path: Path, quantize: str, *, external_data: Optional[bool] = None,
                   int4_block_size: Optional[int] = None) -> None:
    """``int4_block_size``: weights per scale (None: ``INT4_BLOCK_SIZE``)."""
    if quantize == "int8":
        _quantize_int8(path, external_data)
    elif quantize == "int4":
        _quantize_int4(path, external_data, int4_block_size or INT4_BLOCK_SIZE)
    else:
        raise ExportError(f"unknown quantization {quantize!r}")


def _quantize_int8(path: Path, external_data: Optional[bool]) -> None:
    """Dynamic int8, the pattern onnxruntime's ``quantize_dynamic`` writes and fuses into DynamicQuantizeMatMul at
    load: every MatMul with a constant 2-D weight gets int8 weights (one symmetric scale per output column) and its input
    quantized to uint8 at run time. Written here rather than by ``quantize_dynamic``, whose loader and quantizer keep
    the fp32 graph, a shape-inferred copy and the int8 weights at once (4.1x the fp32 weights on a 1.1B model):
    each fp32 weight is replaced in place, so the graph is in memory once."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    model = graph_io.load(path)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    # A weight read by anything but MatMuls (tied embeddings through a Gather) keeps its fp32 copy beside the int8.
    readers: dict = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in weights:
                readers.setdefault(name, set()).add("B" if _linear(node) and slot == 1 else "other")
    nodes, quantized_inputs, done = [], {}, {}
    for node in graph.node:
        weight = weights.get(node.input[1]) if _linear(node) else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        b = weight.name
        transposed = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
        if b not in done:
            values = numpy_helper.to_array(weight)
            if transposed:  # Gemm's (N, K) weight as MatMul's (K, N)
                values = np.ascontiguousarray(values.T)
            # One symmetric scale per output column: a column of small weights keeps its resolution instead of
            # sharing the largest weight's step (MiniLM, 20-token adapter: gate error 0.86 per tensor, 0.14 per column).
            scale = np.maximum(np.abs(values).max(axis=0), 1e-12).astype(np.float32) / np.float32(127.0)
            q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
            del values
            if readers[b] == {"B"}:
                weight.CopyFrom(numpy_helper.from_array(q, b + "_quantized"))  # the fp32 bytes go here
            else:
                graph.initializer.append(numpy_helper.from_array(q, b + "_quantized"))
            graph.initializer.extend([numpy_helper.from_array(scale, b + "_scale"),
                                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), b + "_zero_point")])
            done[b] = b + "_quantized"
        a = node.input[0]
        if a not in quantized_inputs:
            quantized_inputs[a] = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(quantized_inputs[a]),
                                          name=f"{a}_QuantizeLinear"))
        a_q, a_scale, a_zero = quantized_inputs[a]
        out, tag = node.output[0], node.name or node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if bias:  # Gemm = MatMul + bias
            out = f"{tag}_matmul"
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{tag}_bias_add"))
        nodes += [
            helper.make_node("Mul", [a_scale, b + "_scale"], [f"{tag}_scales"], name=f"{tag}_scales_mul"),
            helper.make_node("MatMulInteger", [a_q, done[b], a_zero, b + "_zero_point"], [f"{tag}_int32"],
                             name=f"{tag}_quant"),
            helper.make_node("Cast", [f"{tag}_int32"], [f"{tag}_float"], to=TensorProto.FLOAT,
                             name=f"{tag}_cast"),
            helper.make_node("Mul", [f"{tag}_float", f"{tag}_scales"], [out], name=f"{tag}_output_scale_mul"),
        ]
    if not done:
        raise ExportError(f"int8 quantization of {path.name} found no MatMul with a constant weight to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    graph_io.save(model, path, external=external_data)


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _linear(node) -> bool:
    """A MatMul, or a Gemm that is one (alpha = beta = 1, A not transposed): their input 1 is the weight."""
    if node.op_type == "MatMul":
        return len(node.input) == 2
    return (node.op_type == "Gemm" and _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0
            and _attr(node, "beta", 1.0) == 1.0)


def quantization_entry(quantize: Optional[str], int4_block_size: Optional[int] = None) -> Optional[dict]:
    """The manifest's ``quantization``: how the int4 weights were made (None for other graphs)."""
    if quantize != "int4":
        return None
    return {"method": "MatMulNBits", "bits": 4, "block_size": int4_block_size or INT4_BLOCK_SIZE, "symmetric": True,
            "accuracy_level": INT4_ACCURACY_LEVEL}


def _quantize_int4(path: Path, external_data: Optional[bool], block_size: int) -> None:
    """Every MatMul with a constant 2-D weight (attention, MLP and the lm_head) becomes a MatMulNBits."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = graph_io.load(path)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
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
