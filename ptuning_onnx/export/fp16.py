"""fp16 graphs for CUDA, made and checked on the CPU.

onnxruntime's converter (``convert_float_to_float16``) turns every float tensor and op into fp16, except a list of
ops it blocks. What must stay fp32, and why:

- **RMSNorm statistics** (Llama, Mistral, Qwen, T5): the exported norm is ``x * 1/sqrt(mean(x^2) + eps)`` as
  plain ``Pow -> ReduceMean -> Add -> Sqrt -> Div``. In fp16 ``x^2`` overflows once ``|x| > 256``, and trained
  decoders carry such "massive activations" in a few channels; the mean becomes inf and the whole row collapses
  to zero. PyTorch computes this in fp32 too (``LlamaRMSNorm`` upcasts). These nodes get explicit casts: fp32 in,
  fp16 out; the normalised ``x`` and everything else stay fp16. Measured (tools/gpu, H200): a tiny Llama with 400
  in one channel of every 7th token passed its golden check on CUDA with the statistics in fp16 (that run's
  graphs came from an earlier version of this rule that inserted no casts), most likely because onnxruntime's
  SimplifiedLayerNormalization fusion, which accumulates in fp32, matched the pattern. The explicit casts make the
  fp32 statistics hold whether or not that fusion matches; they have not run on a GPU yet.
- **LayerNormalization and Softmax**: left in fp16. Their onnxruntime kernels (CPU and CUDA) accumulate mean,
  variance and the softmax sum in fp32 whatever the input type, so casting around them would only add traffic.
- **The final logits**: the lm_head runs in fp16 with fp32 accumulation (cuBLAS' default compute type); only the
  output is rounded to fp16 (a step of 0.008 at |logit| 10). An fp32 lm_head would double the largest single
  weight read of every decoding step (GPT-2-small: 154 MB instead of 77). The runtime upcasts logits before it
  chooses a token, and parity holds the fp16 graph to 1e-2 + 2% of the output scale on every export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import graph_io

# The RMSNorm statistics chain after Pow(x, 2); Reciprocal where an exporter writes 1/sqrt that way.
_NORM_CHAIN = ("ReduceMean", "Add", "Sqrt", ("Div", "Reciprocal"))


def norm_statistics_nodes(graph) -> list[str]:
    """Names of the ``Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div|Reciprocal`` nodes of every RMSNorm."""
    from onnx import numpy_helper

    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = node.attribute[0].t
    found = []
    for node in graph.node:
        if node.op_type != "Pow" or node.input[1] not in constants:
            continue
        exponent = numpy_helper.to_array(constants[node.input[1]])
        if exponent.size != 1 or float(exponent.reshape(())) != 2.0:
            continue
        chain, current = [node], node
        for wanted in _NORM_CHAIN:
            following = [c for c in consumers.get(current.output[0], [])
                         if c.op_type in (wanted if isinstance(wanted, tuple) else (wanted,))]
            if len(following) != 1:
                break
            current = following[0]
            chain.append(current)
        else:
            found.extend(n.name for n in chain)
    return found


def to_fp16(path: Path, external_data: Optional[bool]) -> dict:
    """Convert the graph at ``path`` in place; returns what stayed fp32 (for the manifest).

    The converter's own ``node_block_list`` cannot be used for the norm statistics: without shape inference (which
    a 1.1B graph cannot afford) it knows no tensor types, inserts no casts, and the blocked nodes simply receive fp16
    inputs. So everything is converted, then each statistics chain gets explicit casts: its inputs from outside the
    chain (``x``, the exponent, eps) to fp32, and its result back to fp16.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = graph_io.load(path)
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):  # the chains are found, then cast, by node name
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    chains = norm_statistics_chains(model.graph)
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    _statistics_in_fp32(model.graph, chains)
    graph_io.save(model, path, external=external_data)
    return {"fp32_chains": len(chains), "rule": "RMSNorm statistics (Pow, ReduceMean, Add, Sqrt, Div) in fp32"}


def norm_statistics_chains(graph) -> list[list[str]]:
    names = norm_statistics_nodes(graph)
    return [names[i:i + 1 + len(_NORM_CHAIN)] for i in range(0, len(names), 1 + len(_NORM_CHAIN))]


def _statistics_in_fp32(graph, chains: list) -> None:
    from onnx import TensorProto, helper

    by_name = {node.name: node for node in graph.node}
    position = {node.name: i for i, node in enumerate(graph.node)}
    inserts: list = []  # (index to insert before, node)
    for chain in chains:
        nodes = [by_name[name] for name in chain]
        inside = {out for node in nodes for out in node.output}
        for node in nodes:
            for i, name in enumerate(node.input):
                if node.op_type == "ReduceMean" and i > 0:
                    continue  # its axes (int64), not data
                if name and name not in inside:
                    cast = f"{node.name}/to_fp32_{i}"
                    inserts.append((position[node.name], helper.make_node(
                        "Cast", [name], [cast], name=cast, to=TensorProto.FLOAT)))
                    node.input[i] = cast
        last = nodes[-1]
        result, back = last.output[0], f"{last.name}/to_fp16"
        for consumer in graph.node:
            for i, name in enumerate(consumer.input):
                if name == result:
                    consumer.input[i] = back
        for output in graph.output:
            if output.name == result:
                raise ValueError(f"RMSNorm statistics {result} is a graph output; cannot cast it back")
        inserts.append((position[last.name] + 1, helper.make_node(
            "Cast", [result + "_fp32"], [back], name=back, to=TensorProto.FLOAT16)))
        last.output[0] = result + "_fp32"
    for index, node in sorted(inserts, key=lambda item: item[0], reverse=True):
        graph.node.insert(index, node)
