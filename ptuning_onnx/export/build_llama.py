"""A fused causal-lm graph for the Llama family, written node by node instead of traced.

The TorchScript trace of a Llama decoder is ~300 small nodes per layer (rotary as slices and concats, RMS norm as
Pow/ReduceMean/Sqrt/Div, the causal mask rebuilt every step), and onnxruntime's fusions find only the norms and the
rotary in it: at batch 1 each decoding step is launch-bound. This module writes the same computation in 17 nodes
per layer with onnxruntime's contrib ops, as onnxruntime-genai's model builder does for a base model:

    SkipSimplifiedLayerNormalization -> MatMul (packed q|k|v) -> Split -> RotaryEmbedding (q, k)
    -> GroupQueryAttention (grouped KV heads, causal, past + new keys in one buffer) -> MatMul (o)
    -> SkipSimplifiedLayerNormalization -> MatMul (packed gate|up) -> Split -> SiLU * up -> MatMul (down)

Its inputs and outputs are the traced graph's (``wrappers.causal_spec``), with one difference: the KV cache holds
the prompt. ``present.*`` are (B, KV, n + T, D), the prompt's n positions first, and the past given back holds them
too (the traced graph joins them in front of the user's past at every step and cuts them off each present, three
copies of the cache per layer and step). Callers that pass each present back as the next past, as the runtime,
parity, golden.npz, onnxruntime-genai and the service do, see no difference; the service's batcher keeps the
leading positions when it trims or pads a cache. Inside:

- the prompt's keys/values (rotary applied, computed once by ``CausalLMGraph``) are constants. At the prefill (empty
  past) they join the NEW keys/values behind placeholder queries whose outputs are dropped, so GroupQueryAttention
  runs its first-prompt mode, which takes a batch of any size (after a past it takes several new tokens only one
  row at a time);
- the mask becomes GroupQueryAttention's ``attention_bias`` (0 or float32 min per key position, the prompt's
  always 0), so left padding works; every row's ``seqlens_k`` is the full buffer, as padding is in the bias;
- rotary uses the reference's own cos/sin (its ``rotary_emb`` module, scaling included) at ``position_ids + n``;
- past and present may be ONE preallocated buffer (B, KV, M, D), bound as both (GroupQueryAttention's
  past_present_share_buffer mode, as onnxruntime-genai runs its graphs): each step writes its S keys/values in
  place at positions n + T - S .. n + T - 1 (T: the mask's length, past and new tokens) and nothing is copied. The
  runtime's CPU loop does this after the prefill (manifest ``model.past_present_share_buffer``,
  runtime/session.py ``SharedKVCache``);
- a template's placeholder ids (``vocab_size + k``, reference_template.py) take row k of its prompt table at the
  embedding; its leading slot is the prompt above (n may be 0);
- several prompts (a list of references, multi-prompt folders): (K, N, ...) tables gathered by ``prompt_ids``.

Weights come from the reference model's own tensors, q|k|v and gate|up packed into one MatMul each, so the int8
and int4 passes (optimize.py) quantize 4 MatMuls per layer plus the lm_head. Families: llama, mistral (no sliding
window), qwen2 (q/k/v biases); anything else (other rope types, sliding windows, biases elsewhere) is refused with
the reason, and the export keeps the traced graph.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np

from ..manifest import version_tuple
from . import graph_io
from .wrappers import LOGITS_TO_KEEP, CausalLMGraph, causal_spec

FAMILIES = ("llama", "mistral", "qwen2")
# GroupQueryAttention's attention_bias input (our mask) on the CPU: onnxruntime 1.22 (microsoft/onnxruntime#23944).
MIN_ONNXRUNTIME = "1.22"
MS = "com.microsoft"
_F32_MIN = float(np.finfo(np.float32).min)


def unsupported(config) -> Optional[str]:
    """Why this config cannot be built (None when it can)."""
    import onnxruntime as ort

    if version_tuple(ort.__version__) < version_tuple(MIN_ONNXRUNTIME):
        return f"onnxruntime {ort.__version__} (GroupQueryAttention's attention_bias needs {MIN_ONNXRUNTIME})"
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (only silu)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if model_type != "qwen2" and getattr(config, "attention_bias", False):
        return "attention biases"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", model_type == "mistral"):
        return "a sliding attention window"
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("dynamic", "longrope"):
        return f"rope scaling {kind!r} (its frequencies depend on the sequence length)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


class _Graph:
    """Nodes, initializers and unique names for one graph. With ``sink`` (an open data file named ``location``),
    each weight's bytes go to the file as it is made, so a 1B model is never held twice in memory."""

    def __init__(self, sink=None, location: str = ""):
        self.nodes: list = []
        self.weights: list = []
        self._count = 0
        self.sink, self.location = sink, location

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        if self.sink is not None and len(tensor.raw_data) >= graph_io.SIZE_THRESHOLD:
            graph_io._append(self.sink, tensor, tensor.raw_data, self.location)  # page-aligned, as graph_io.save
        self.weights.append(tensor)
        return name

    def op(self, op_type: str, inputs: list, outputs=1, domain: str = "", hint: Optional[str] = None, **attrs):
        from onnx import helper

        if isinstance(outputs, int):
            outputs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), domain=domain,
                                           **attrs))
        named = [o for o in outputs if o]  # "" skips an optional output
        return named[0] if len(named) == 1 else named


def build(ref, path: Path, *, opset: int = 18, external_data: Optional[bool] = None) -> dict:
    """Write the fused graph of ``ref`` (a baked causal-lm ``PTuningModel``) to ``path``; returns its fused-op
    counts. ``ref`` may be a list of references of one base model: a multi-prompt graph (``prompt_ids`` input,
    each row's prompt gathered from tables with N = the longest prompt's slots, as ``MultiCausalLMGraph``)."""
    import onnx
    from onnx import helper

    refs = ref if isinstance(ref, (list, tuple)) else None
    if refs is not None:
        from .multi import MultiCausalLMGraph
        from .prompt_tables import PROMPT_IDS

        ref = refs[0]
    config = ref.base.config
    reason = unsupported(config)
    if reason:
        raise ValueError(f"no fused graph for this model: {reason}")
    # The prompts' keys/values, as the traced graph holds them
    traced = CausalLMGraph(ref) if refs is None else MultiCausalLMGraph(list(refs))
    spec = causal_spec(traced.num_layers, () if refs is None else (PROMPT_IDS,))
    params = {k: v.detach().float().numpy() for k, v in ref.base.state_dict().items()}  # views, no copies
    if external_data is None:
        external_data = sum(v.nbytes for v in params.values()) > graph_io.EXTERNAL_THRESHOLD
    data = Path(path).parent / graph_io.data_name(Path(path))
    if data.exists():
        data.unlink()
    with open(data, "wb") if external_data else contextlib.nullcontext() as sink:
        g = _Graph(sink, data.name)
        _layers_into(g, ref, traced, spec, params, config)
    inputs = _value_infos(spec, traced, config, kind="inputs")
    outputs = _value_infos(spec, traced, config, kind="outputs")
    graph = helper.make_graph(g.nodes, "ptuning_llama_fused", inputs, outputs, g.weights)
    graph.initializer.append(_default(LOGITS_TO_KEEP, spec.defaults[LOGITS_TO_KEEP]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="ptuning-onnx", doc_string="fused Llama-family causal-lm graph")
    model.ir_version = 8
    if external_data:
        onnx.save_model(model, str(path))  # the weights are in the data file already
    else:
        graph_io.save(model, path, external=False)
    counts: dict = {}
    for node in g.nodes:
        if node.domain == MS or node.op_type == "SimplifiedLayerNormalization":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _layers_into(g: _Graph, ref, traced, spec, params: dict, config) -> None:
    """Every node and weight of the fused graph, into ``g``."""
    import torch
    from onnx import TensorProto

    heads, kv_heads = config.num_attention_heads, traced.kv_heads
    head_dim = traced.head_dim
    n = traced.n  # prompt slots: the prompt's positions, or the longest prompt's (multi-prompt)
    multi = hasattr(traced, "prompt_mask")
    inner = "model."

    def weight(key: str) -> np.ndarray:
        return params[inner + key]

    one = g.const("one", np.array([1], np.int64))
    zero = g.const("zero", np.array([0], np.int64))

    # Shapes, the mask as an additive bias over the prompt + past + new keys, and the rotary positions.
    ids_shape = g.op("Shape", ["input_ids"])
    batch = g.op("Gather", [ids_shape, zero], axis=0)  # (1,)
    seq = g.op("Gather", [ids_shape, one], axis=0)
    per_row2, per_row3 = g.op("Concat", [batch, one], axis=0), g.op("Concat", [batch, one, one], axis=0)

    def rows_of(table: str, per_row: str) -> str:
        """A (K, ...) prompt table -> (B, ...): each row's prompt (``prompt_ids``), or the one prompt for all."""
        return g.op("Gather", [table, "prompt_ids"], axis=0) if multi else g.op("Expand", [table, per_row])

    # Prompt slots a row attends to: all n of a single prompt; a shorter prompt's own (real first) of the N slots.
    # A template without a leading slot has no prompt in the cache (n = 0): then none of the prompt's machinery is
    # written (no zero-size constants, which onnxruntime's constant folding has mishandled, docs/FORMAT.md).
    slots = traced.prompt_mask.numpy().astype(np.int64) if multi else np.ones((1, n), np.int64)
    full_mask = (g.op("Concat", [rows_of(g.const("prompt_mask", slots), per_row2), "attention_mask"], axis=1)
                 if n else "attention_mask")  # (B, n + T)
    total = g.op("Gather", [g.op("Shape", [full_mask]), one], axis=0)  # (1,) n + T
    # The KV cache holds the prompt: ``present.*`` are (B, KV, n + T, D), and a past given back holds it too. At the
    # prefill (the past is empty) the prompt's keys/values join the NEW keys, each with a placeholder query whose
    # output is dropped: GroupQueryAttention's first-prompt mode, which takes any batch. Afterwards the past leads
    # with them, and nothing is copied but what GroupQueryAttention itself appends. (A chunk of several tokens after
    # a past, which the runtime never sends, is its "subsequent prompt" mode, which onnxruntime runs one row at a
    # time: a batch of several such rows is refused by onnxruntime.)
    # The prefill is told by the mask covering the new tokens only (T == S), not by the past's length: a past that
    # shares one preallocated buffer with its present (the runtime's decoding loop on the CPU) is never empty.
    if n:
        cut = g.const("prompt_len", np.array([n], np.int64))
        mask_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)  # (1,) T
        n_new = g.op("Mul", [g.op("Cast", [g.op("Equal", [mask_len, seq])], to=TensorProto.INT64), cut])  # n or 0
        queries = g.op("Add", [seq, n_new])  # (1,) S' = n_new + S
    else:
        queries = seq
    # One additive bias (B, 1, S', n + T): 0 where a query may see a key (causal, and the key is the prompt's or a
    # real token), float32 min elsewhere; left padding lives here, so every row's seqlens_k is the full buffer.
    total_s, queries_s = g.op("Squeeze", [total, zero]), g.op("Squeeze", [queries, zero])
    step = g.const("step", np.array(1, np.int64))
    rows = g.op("Range", [g.op("Sub", [total_s, queries_s]), total_s, step])  # the queries' places in the buffer
    cols = g.op("Range", [g.const("zero_s", np.array(0, np.int64)), total_s, step])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [cols, zero]), g.op("Unsqueeze", [rows, one])])  # (S', L)
    valid = g.op("Unsqueeze", [g.op("Cast", [full_mask], to=TensorProto.BOOL), one])  # (B, 1, L)
    visible = g.op("And", [g.op("Unsqueeze", [causal, zero]), valid])  # (B, S', L)
    bias = g.op("Where", [visible, g.const("zero_f", np.array(0.0, np.float32)),
                          g.const("f32_min", np.array(_F32_MIN, np.float32))])
    bias = g.op("Unsqueeze", [bias, one], hint="attention_bias")  # (B, 1, S', L)
    total_i32 = g.op("Cast", [total_s], to=TensorProto.INT32)  # scalar
    seqlens = g.op("Expand", [g.op("Sub", [total_i32, g.const("one_i32", np.array(1, np.int32))]), batch],
                   hint="seqlens_k")  # (B,)
    if multi:  # user position p of a row of adapter k sits at model position n_k + offset + p
        offsets = g.const("offset", traced.prompt_offset.numpy().astype(np.int64))
        rotary_pos = g.op("Add", ["position_ids", g.op("Unsqueeze", [g.op("Gather", [offsets, "prompt_ids"], axis=0),
                                                                       one])])
        limit_offset = int(traced.prompt_offset.max())
    else:
        rotary_pos = g.op("Add", ["position_ids", g.const("offset", np.array(traced.offset, np.int64))])
        limit_offset = traced.offset

    # The reference's own rotary tables (its scaling included), one row per position.
    limit = int(getattr(config, "max_position_embeddings", 2048)) + limit_offset
    with torch.no_grad():
        probe = torch.zeros(1, 1, head_dim)
        cos, sin = ref.base.model.rotary_emb(probe, torch.arange(limit).unsqueeze(0))
    cos_cache = g.const("cos_cache", cos[0, :, : head_dim // 2].float().numpy())
    sin_cache = g.const("sin_cache", sin[0, :, : head_dim // 2].float().numpy())

    words = weight("embed_tokens.weight")
    if getattr(ref, "template", None) is not None:
        # A template's placeholder id vocab_size + k takes row k of its prompt table, as reference_template's
        # embed_tokens does: one table of the vocabulary's rows and then the prompt's, one Gather (the runtime
        # refuses ids past the table).
        words = np.concatenate([words, ref.prompt_rows().detach().float().numpy()], 0)
    hidden_states = g.op("Gather", [g.const("embed_tokens", words), "input_ids"], axis=0)
    eps = float(config.rms_norm_eps)
    inter = int(config.intermediate_size)
    qkv_sizes = g.const("qkv_sizes", np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))
    mlp_sizes = g.const("mlp_sizes", np.array([inter, inter], np.int64))
    axis1 = one
    end = g.const("end", np.array([np.iinfo(np.int64).max], np.int64))

    # The leads: the first n_new (n or 0) positions of (K, n, W) constants for every row, sliced, expanded (or
    # gathered by prompt_ids) and split once for all layers, so a decoding step (n_new = 0) runs a few empty nodes
    # here instead of two per tensor.
    if n:
        zeros_q = g.const("placeholder_q", np.zeros((1, n, heads * head_dim), np.float32))
        q_lead = g.op("Expand", [g.op("Slice", [zeros_q, zero, n_new, axis1]), per_row3])
        # Every layer's prompt keys and values side by side, (K, n, layers * 2 * KV * D): k0 v0 k1 v1 ...
        prompt_kv = np.concatenate([getattr(traced, f"prompt_{kind}_{i}").detach().float().numpy()
                                    .transpose(0, 2, 1, 3).reshape(len(slots), n, kv_heads * head_dim)
                                    for i in range(traced.num_layers) for kind in ("key", "value")], axis=-1)
        parts = 2 * traced.num_layers
        kv_sizes = g.const("kv_sizes", np.full(parts, kv_heads * head_dim, np.int64))  # a sizes input: opset >= 13
        kv_leads = g.op("Split", [rows_of(g.op("Slice", [g.const("prompt_kv", prompt_kv), zero, n_new, axis1]),
                                          per_row3), kv_sizes], outputs=parts, axis=-1)
    residual = None
    for i in range(traced.num_layers):
        layer = f"layers.{i}."
        norm_w = g.const(f"ln_in_{i}", weight(layer + "input_layernorm.weight"))
        if residual is None:
            normed = g.op("SimplifiedLayerNormalization", [hidden_states, norm_w], epsilon=eps, axis=-1,
                          stash_type=1)
            residual = hidden_states
        else:
            normed, residual = g.op("SkipSimplifiedLayerNormalization", [hidden_states, residual, norm_w],
                                    outputs=[g.name("normed"), "", "", g.name("residual")], domain=MS, epsilon=eps)
        attn = layer + "self_attn."
        qkv_w = np.concatenate([weight(attn + f"{p}_proj.weight") for p in "qkv"], 0).T
        qkv = g.op("MatMul", [normed, g.const(f"qkv_{i}", qkv_w)])
        if (inner + attn + "q_proj.bias") in params:
            qkv_b = np.concatenate([weight(attn + f"{p}_proj.bias") for p in "qkv"], 0)
            qkv = g.op("Add", [qkv, g.const(f"qkv_bias_{i}", qkv_b)])
        q, k, v = g.op("Split", [qkv, qkv_sizes], outputs=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, rotary_pos, cos_cache, sin_cache], domain=MS, num_heads=heads, interleaved=0)
        k = g.op("RotaryEmbedding", [k, rotary_pos, cos_cache, sin_cache], domain=MS, num_heads=kv_heads,
                 interleaved=0)
        new = [g.op("Concat", [lead, current], axis=1)
               for lead, current in ((q_lead, q), (kv_leads[2 * i], k), (kv_leads[2 * i + 1], v))] if n else [q, k, v]
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        out = g.op("GroupQueryAttention", [*new, past_k, past_v, seqlens, total_i32, "", "", "", bias],
                   outputs=[g.name("attention"), present_k, present_v], domain=MS, num_heads=heads,
                   kv_num_heads=kv_heads, scale=float(head_dim ** -0.5))[0]
        if n:
            out = g.op("Slice", [out, n_new, end, axis1])  # the placeholder queries' outputs dropped
        attn_out = g.op("MatMul", [out, g.const(f"o_{i}", weight(attn + "o_proj.weight").T)])
        post_w = g.const(f"ln_post_{i}", weight(layer + "post_attention_layernorm.weight"))
        normed, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, post_w],
                                outputs=[g.name("normed"), "", "", g.name("residual")], domain=MS, epsilon=eps)
        mlp = layer + "mlp."
        gate_up_w = np.concatenate([weight(mlp + "gate_proj.weight"), weight(mlp + "up_proj.weight")], 0).T
        gate, up = g.op("Split", [g.op("MatMul", [normed, g.const(f"gate_up_{i}", gate_up_w)]),
                                  mlp_sizes], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        hidden_states = g.op("MatMul", [act, g.const(f"down_{i}", weight(mlp + "down_proj.weight").T)])
    final_w = g.const("norm", weight("norm.weight"))
    normed = g.op("SkipSimplifiedLayerNormalization", [hidden_states, residual, final_w], domain=MS, epsilon=eps)

    # logits_to_keep: the last k positions (0 = all), as the trace does.
    k = g.op("Reshape", [LOGITS_TO_KEEP, one])
    start = g.op("Where", [g.op("Greater", [k, zero]), g.op("Neg", [g.op("Min", [k, seq])]), zero])
    kept = g.op("Slice", [normed, start, end, one])
    lm_head = params.get("lm_head.weight", params[inner + "embed_tokens.weight"])
    g.op("MatMul", [kept, g.const("lm_head", lm_head.T)], outputs=["logits"])


def _default(name: str, value: int):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, np.int64), name)


def _value_infos(spec, traced, config, *, kind: str) -> list:
    from onnx import TensorProto, helper

    axes = spec.dynamic_axes
    infos = []
    names = [n for n in spec.inputs if n != LOGITS_TO_KEEP] if kind == "inputs" else spec.outputs
    for name in names:
        if name in ("input_ids", "attention_mask", "position_ids"):
            shape, dtype = [axes[name][0], axes[name][1]], TensorProto.INT64
        elif name == "prompt_ids":
            shape, dtype = [axes[name][0]], TensorProto.INT64
        elif name == "logits":
            shape, dtype = [axes[name][0], axes[name][1], int(config.vocab_size)], TensorProto.FLOAT
        else:
            shape, dtype = [axes[name][0], traced.kv_heads, axes[name][2], traced.head_dim], TensorProto.FLOAT
        infos.append(helper.make_tensor_value_info(name, dtype, shape))
    if kind == "inputs":
        infos.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    return infos
