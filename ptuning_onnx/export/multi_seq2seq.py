"""Multi-prompt seq2seq-lm (T5, BART): the single export's two graphs, each also taking ``prompt_ids`` (B,).

The encoder prepends each row's prompt, gathered from the padded table (prompt_tables.py), and masks the unused
slots; the decoder extends the user's encoder mask with the same row's slot mask, so cross-attention sees exactly
the encoder positions that adapter's single export has. A row's n_k real slots END the N slots (pads first): T5's
attention sees relative positions only, so its user tokens then sit at the same distance from every real prompt
slot as in the single export. Models with absolute positions (BART) need equal lengths (N = n_k: nothing moves);
multi.py's ``load_references`` refuses them otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from .prompt_tables import PROMPT_IDS, gather_prompts, register_prompts
from .wrappers import GraphSpec, Seq2SeqDecoderGraph, Seq2SeqEncoderGraph, encode


class MultiSeq2SeqEncoderGraph(nn.Module):
    """Encoder with K prompts, one per row.

    Inputs: input_ids (B, S), attention_mask (B, S), prompt_ids (B,) in [0, K).
    Output: last_hidden_state (B, N+S, D): N prompt slots (a row's pads, then its n_k real ones), then the user's.
    """

    def __init__(self, refs: list):
        super().__init__()
        self.single = Seq2SeqEncoderGraph(refs[0])  # the interface, over the shared base
        self.n = register_prompts(self, refs, real_last=True)

    def spec(self) -> GraphSpec:
        spec = self.single.spec()
        spec.inputs.append(PROMPT_IDS)
        spec.dynamic_axes[PROMPT_IDS] = {0: "batch"}
        return spec

    def example(self, batch=2, seq=5):
        return (*self.single.example(batch, seq), torch.arange(batch) % self.prompt_n.shape[0])

    def forward(self, input_ids, attention_mask, prompt_ids):
        base = self.single.ref.base
        embeds = base.get_input_embeddings()(input_ids)
        prompts, prompt_mask = gather_prompts(self, prompt_ids, attention_mask.dtype, embeds.dtype)  # (B, N, D)
        return encode(base, {"inputs_embeds": torch.cat([prompts, embeds], 1),
                             "attention_mask": torch.cat([prompt_mask, attention_mask], 1)})


class MultiSeq2SeqDecoderGraph(nn.Module):
    """Decoder with self-attention past; the encoder mask gets each row's own N-slot prompt mask.

    Inputs: input_ids (B, T); encoder_attention_mask (B, S) user mask; encoder_hidden_states (B, N+S, D);
        prompt_ids (B,); past_key_values.{i}.decoder.key|value (B, H, P, Dh).
    Outputs: logits (B, T, V); present.{i}.decoder.key|value (B, H, P+T, Dh).
    """

    def __init__(self, refs: list):
        super().__init__()
        self.single = Seq2SeqDecoderGraph(refs[0])
        self.num_layers = self.single.num_layers
        self.n = register_prompts(self, refs, real_last=True, tables=False)  # the encoder's slot layout

    def spec(self) -> GraphSpec:
        spec = self.single.spec()
        spec.inputs.insert(3, PROMPT_IDS)  # after encoder_hidden_states, before the past
        spec.dynamic_axes[PROMPT_IDS] = {0: "batch"}
        return spec

    def example(self, batch=2, seq=5, tgt=2, past=3):
        ids, mask, hidden, cache = self.single.example(batch, seq, tgt, past)
        hidden = torch.cat([hidden[:, :1].expand(-1, self.n, -1), hidden[:, self.single.ref.n:]], 1)  # (B, N+S, D)
        return ids, mask, hidden, torch.arange(batch) % self.prompt_n.shape[0], cache

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, prompt_ids, past):
        prompt_mask = self.prompt_mask.index_select(0, prompt_ids).to(encoder_attention_mask.dtype)  # (B, N)
        mask = torch.cat([prompt_mask, encoder_attention_mask], 1)
        return self.single.decode(input_ids, mask, encoder_hidden_states, past)
