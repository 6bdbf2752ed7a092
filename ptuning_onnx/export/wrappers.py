"""Modules that are traced into the ONNX graphs, one per graph kind.

Each wraps the PyTorch reference (``PTuningModel``) or its base, and exposes Hugging Face's standard input and
output names, so that the virtual tokens are invisible from outside: lengths, masks and positions count the
user's tokens only. Each also carries its graph spec (names, dynamic axes, example inputs) as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..reference import PTuningModel

# The one optional input: the number of trailing positions whose logits are computed (0 = all, the default, as
# transformers' ``logits_to_keep``). Generation sets 1 for the prefill; every other consumer can ignore it.
LOGITS_TO_KEEP = "logits_to_keep"


@dataclass
class GraphSpec:
    name: str  # "model", "encoder_model", "decoder_model"
    inputs: list  # ONNX input names in positional order
    outputs: list
    dynamic_axes: dict
    defaults: dict = field(default_factory=dict)  # input name -> default value, stored as an initializer


def _layers(cache) -> list:
    """[(key, value)] per layer from a legacy tuple (what optimum's patcher returns) or a ``Cache`` object."""
    if isinstance(cache, (tuple, list)):
        return [(layer[0], layer[1]) for layer in cache]
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v, *_ in cache.to_legacy_cache()]


def dynamic_cache(pairs):
    """A ``DynamicCache`` holding ``pairs``; built inside the graph so no Cache object is a graph input."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for i, (key, value) in enumerate(pairs):
        cache.update(key, value, i)
    return cache


def _kv_names(prefix: str, layers: int, kind: str = "") -> list:
    kind = f".{kind}" if kind else ""
    return [f"{prefix}.{i}{kind}.{t}" for i in range(layers) for t in ("key", "value")]


def decode(model, kwargs: dict, input_ids, logits_to_keep, keep_native: bool, n: int) -> tuple:
    """The causal-lm graphs' shared step: ``model(**kwargs)`` with the logits of the last ``logits_to_keep``
    positions (0 = all) -> (logits, present.0.key, present.0.value, ...), each present without its first ``n``
    (prompt) positions, which the graph holds itself."""
    # Indices of the positions whose logits are wanted, built from tensor ops so the trace keeps them dynamic.
    steps = torch.cumsum(torch.ones_like(input_ids[0]), 0) - 1  # (S,) = 0..S-1
    seq = steps[-1:] + 1
    keep = torch.where(logits_to_keep > 0, torch.minimum(logits_to_keep, seq), seq)
    index = steps[steps >= seq - keep]
    if keep_native:
        out = model(**kwargs, logits_to_keep=index)
        logits = out["logits"]
    else:
        out = model(**kwargs)
        logits = out["logits"].index_select(1, index)
    presents = []
    for key, value in _layers(out["past_key_values"]):
        presents += [key[:, :, n:], value[:, :, n:]]
    return (logits, *presents)


def causal_spec(num_layers: int, row_inputs: tuple = ()) -> GraphSpec:
    """The causal-lm graph's interface; ``row_inputs``: (batch,) inputs after ``position_ids`` (``prompt_ids``)."""
    past, present = _kv_names("past_key_values", num_layers), _kv_names("present", num_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "logits_sequence"}}
    axes.update({name: {0: "batch"} for name in row_inputs})
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present})
    return GraphSpec("model", ["input_ids", "attention_mask", "position_ids", *row_inputs, *past, LOGITS_TO_KEEP],
                     ["logits", *present], axes, defaults={LOGITS_TO_KEEP: 0})


def causal_example(graph, batch: int, seq: int, past: int, row_values: tuple = ()) -> tuple:
    """Trace inputs in ``causal_spec``'s order for a graph with ``model``, ``num_layers``, ``kv_heads``,
    ``head_dim`` and ``prompt_key_0``; ``row_values``: the tensors of its ``row_inputs``."""
    vocab = graph.model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    dtype = graph.prompt_key_0.dtype
    return (torch.randint(0, vocab, (batch, seq), generator=g), torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous(), *row_values,
            [torch.randn(batch, graph.kv_heads, past, graph.head_dim, generator=g).to(dtype)
             for _ in range(2 * graph.num_layers)],
            torch.tensor(0))


class CausalLMGraph(nn.Module):
    """Decoder with past; the prompt's keys/values are constants computed once at export time.

    The virtual tokens come first and attention is causal, so their keys/values never depend on the input.
    Inside: prompt KV joined in front of the user's past, mask prefixed with n ones, positions shifted by n,
    and the first n positions cut off each ``present``.

    Inputs: input_ids (B, S) int64; attention_mask (B, P+S) int64; position_ids (B, S) int64;
        past_key_values.{i}.key|value (B, KV, P, Dh); logits_to_keep () int64, default 0 = all.
    Outputs: logits (B, S or k, V); present.{i}.key|value (B, KV, P+S, Dh).
    """

    def __init__(self, ref: PTuningModel):
        super().__init__()
        self.model = ref.base
        self.n = ref.n
        # A template's model (reference_template.py) also fills placeholder ids inside input_ids from its table.
        self.templated = ref if getattr(ref, "template", None) is not None else None
        with torch.no_grad():
            # A template that opens with text has no prefix (n = 0): one token's cache, cut to none, gives the shapes.
            prompt = ref.prompt_embeds(1) if self.n else ref.base.get_input_embeddings().weight[:1].unsqueeze(0)
            positions = torch.arange(prompt.shape[1]).unsqueeze(0) + ref.position_offset
            kwargs = {"position_ids": positions} if ref._takes_positions else {}
            out = ref.base(inputs_embeds=prompt, use_cache=True, **kwargs)
        self.offset = self.n + ref.position_offset  # user position p sits at model position n + offset + p
        self.takes_positions = ref._takes_positions
        legacy = [(key[:, :, :self.n], value[:, :, :self.n]) for key, value in _layers(out.past_key_values)]
        self.num_layers = len(legacy)
        for i, (key, value) in enumerate(legacy):
            self.register_buffer(f"prompt_key_{i}", key.detach().clone())  # (1, KV, n, Dh)
            self.register_buffer(f"prompt_value_{i}", value.detach().clone())
        self.kv_heads, self.head_dim = legacy[0][0].shape[1], legacy[0][0].shape[3]
        import inspect

        self._keep_native = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def spec(self) -> GraphSpec:
        return causal_spec(self.num_layers)

    def example(self, batch=2, seq=3, past=4):
        return causal_example(self, batch, seq, past)

    def forward(self, input_ids, attention_mask, position_ids, past, logits_to_keep):
        batch = input_ids.shape[0]
        cache, mask = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)], attention_mask
        if self.n:  # no zero-size prompt tensors in the graph: onnxruntime's optimizer mis-folds them (FORMAT.md)
            cache = []
            for i in range(self.num_layers):
                key = getattr(self, f"prompt_key_{i}").expand(batch, -1, -1, -1)
                value = getattr(self, f"prompt_value_{i}").expand(batch, -1, -1, -1)
                cache.append((torch.cat([key, past[2 * i]], 2), torch.cat([value, past[2 * i + 1]], 2)))
            ones = torch.ones_like(attention_mask[:, :1]).expand(-1, self.n)
            mask = torch.cat([ones, attention_mask], 1)
        inputs = ({"input_ids": input_ids} if self.templated is None
                  else {"inputs_embeds": self.templated.embed_tokens(input_ids)})
        kwargs = dict(**inputs, attention_mask=mask, past_key_values=dynamic_cache(cache), use_cache=True)
        if self.takes_positions:
            kwargs["position_ids"] = position_ids + self.offset
        return decode(self.model, kwargs, input_ids, logits_to_keep, self._keep_native, self.n)


class EncoderTaskGraph(nn.Module):
    """seq-cls, token-cls and feature-extraction: the reference's own forward, prompt baked as a constant.

    Inputs: input_ids (B, S), attention_mask (B, S) [, token_type_ids (B, S)].
    Outputs: logits (B, L) | logits (B, S, L) | last_hidden_state (B, S, D), user positions only.
    """

    OUTPUT = {"SEQ_CLS": "logits", "TOKEN_CLS": "logits", "FEATURE_EXTRACTION": "last_hidden_state"}

    def __init__(self, ref: PTuningModel, extra_inputs: list):
        super().__init__()
        self.ref = ref
        self.extra = list(extra_inputs)
        self.output = self.OUTPUT[ref.task.value]

    def spec(self) -> GraphSpec:
        names = ["input_ids", "attention_mask", *self.extra]
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        axes[self.output] = {0: "batch"} if self.ref.task.value == "SEQ_CLS" else {0: "batch", 1: "sequence"}
        return GraphSpec("model", names, [self.output], axes)

    def example(self, batch=2, seq=5):
        vocab = self.ref.base.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        return (ids, torch.ones_like(ids), *[torch.zeros_like(ids) for _ in self.extra])

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.ref(input_ids, attention_mask, token_type_ids)[self.output]


class Seq2SeqEncoderGraph(nn.Module):
    """Encoder with the prompt prepended inside.

    Inputs: input_ids (B, S), attention_mask (B, S). Output: last_hidden_state (B, n+S, D); the decoder graph
    extends the user's mask by n itself, so callers pass the same (B, S) mask to both graphs.
    """

    def __init__(self, ref: PTuningModel):
        super().__init__()
        self.ref = ref

    def spec(self) -> GraphSpec:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "encoder_sequence"}}
        return GraphSpec("encoder_model", ["input_ids", "attention_mask"], ["last_hidden_state"], axes)

    def example(self, batch=2, seq=5):
        vocab = self.ref.base.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        return (ids, torch.ones_like(ids))

    def forward(self, input_ids, attention_mask):
        return encode(self.ref.base, self.ref.extend_inputs(input_ids, attention_mask))


def encode(base, kwargs: dict):
    """The seq2seq base's encoder on prefill ``kwargs`` (inputs_embeds, attention_mask) -> (B, L, D)."""
    import inspect

    encoder = base.get_encoder()
    if "use_cache" in inspect.signature(encoder.forward).parameters:
        kwargs["use_cache"] = False  # optimum's patcher sets config.use_cache on every submodule; T5Stack obeys
    return encoder(**kwargs)[0]


class Seq2SeqDecoderGraph(nn.Module):
    """Decoder with self-attention past; cross-attention keys/values are recomputed each step (simple, small).

    Inputs: input_ids (B, T); encoder_attention_mask (B, S) user mask; encoder_hidden_states (B, n+S, D);
        past_key_values.{i}.decoder.key|value (B, H, P, Dh).
    Outputs: logits (B, T, V); present.{i}.decoder.key|value (B, H, P+T, Dh).
    """

    def __init__(self, ref: PTuningModel):
        super().__init__()
        self.ref = ref
        cfg = ref.base.config
        self.num_layers = cfg.num_decoder_layers if hasattr(cfg, "num_decoder_layers") else cfg.decoder_layers
        self.heads = getattr(cfg, "num_heads", None) or cfg.decoder_attention_heads
        self.head_dim = getattr(cfg, "d_kv", None) or cfg.d_model // self.heads

    def spec(self) -> GraphSpec:
        past = _kv_names("past_key_values", self.num_layers, "decoder")
        present = _kv_names("present", self.num_layers, "decoder")
        axes = {"input_ids": {0: "batch", 1: "decoder_sequence"},
                "encoder_attention_mask": {0: "batch", 1: "encoder_user_sequence"},
                "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                "logits": {0: "batch", 1: "decoder_sequence"}}
        axes.update({name: {0: "batch", 2: "past_decoder_sequence"} for name in past})
        axes.update({name: {0: "batch", 2: "total_decoder_sequence"} for name in present})
        return GraphSpec("decoder_model", ["input_ids", "encoder_attention_mask", "encoder_hidden_states", *past],
                         ["logits", *present], axes)

    def example(self, batch=2, seq=5, tgt=2, past=3):
        cfg = self.ref.base.config
        g = torch.Generator().manual_seed(0)
        dtype = self.ref.base.dtype
        return (torch.randint(0, cfg.vocab_size, (batch, tgt), generator=g), torch.ones(batch, seq, dtype=torch.long),
                torch.randn(batch, self.ref.n + seq, cfg.d_model, generator=g).to(dtype),
                [torch.randn(batch, self.heads, past, self.head_dim, generator=g).to(dtype)
                 for _ in range(2 * self.num_layers)])

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, past):
        ones = torch.ones_like(encoder_attention_mask[:, :1]).expand(-1, self.ref.n)
        return self.decode(input_ids, torch.cat([ones, encoder_attention_mask], 1), encoder_hidden_states, past)

    def decode(self, input_ids, mask, encoder_hidden_states, past) -> tuple:
        """One decoder step over encoder states (B, L, D) whose mask (B, L) covers the virtual slots too."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self_cache = dynamic_cache((past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        cache = EncoderDecoderCache(self_cache, DynamicCache())
        out = self.ref.base(encoder_outputs=(encoder_hidden_states,), attention_mask=mask, decoder_input_ids=input_ids,
                            past_key_values=cache, use_cache=True, return_dict=True)
        cache = out["past_key_values"]
        # Outside optimum's patcher this is an EncoderDecoderCache; inside, a legacy tuple of per-layer tuples.
        layers = _layers(cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache)
        presents = []
        for key, value in layers:
            presents += [key, value]
        return (out["logits"], *presents)
