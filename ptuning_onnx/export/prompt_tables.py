"""The stacked prompts of a multi-prompt graph: K adapters' prompts padded to N slots, one picked per row.

Shared by every multi-prompt graph that prepends prompt embeddings (multi.py's ``MultiEncoderGraph``,
multi_seq2seq.py's encoder and decoder), so the padding, the per-row gathering and the slot masks are one thing.
"""

from __future__ import annotations

import torch
from torch import nn

PROMPT_IDS = "prompt_ids"  # the graphs' (B,) int64 input: each row's adapter id


def padded(tables: list, length: int, axis: int, *, real_last: bool = False) -> torch.Tensor:
    """Stack tensors along a new axis 0, each zero-padded to ``length`` on ``axis``: real entries first, or (with
    ``real_last``) the pad entries first."""
    out = []
    for table in tables:
        pad = list(table.shape)
        pad[axis] = length - table.shape[axis]
        parts = [table, table.new_zeros(pad)]
        out.append(torch.cat(parts[::-1] if real_last else parts, axis))
    return torch.stack(out)


def register_prompts(module: nn.Module, refs: list, *, real_last: bool = False, tables: bool = True) -> int:
    """Register on ``module`` the buffers ``tables`` (K, N, D), ``prompt_mask`` (K, N) and ``prompt_n`` (K,) of
    ``refs``' prompts (one per adapter, in id order); returns N, the longest prompt.

    ``real_last``: each adapter's n_k real slots END the N slots (its pads first). Models whose attention sees
    relative positions only (T5) then see every real prompt slot at the same distance from every user token as in
    that adapter's single export, whatever N is. ``tables=False``: the masks only (a graph that gets the prompts'
    encoder states as input)."""
    n = max(ref.n for ref in refs)
    if tables:
        with torch.no_grad():
            prompts = [ref.prompt_embeds(1)[0] for ref in refs]
        module.register_buffer("tables", padded(prompts, n, 0, real_last=real_last))
    ones = [torch.ones(ref.n, dtype=torch.long) for ref in refs]
    module.register_buffer("prompt_mask", padded(ones, n, 0, real_last=real_last))
    module.register_buffer("prompt_n", torch.tensor([ref.n for ref in refs], dtype=torch.long))
    return n


def gather_prompts(module: nn.Module, prompt_ids: torch.Tensor, mask_dtype: torch.dtype, embed_dtype: torch.dtype):
    """Each row's prompt from ``register_prompts``' buffers: (embeddings (B, N, D), slot mask (B, N))."""
    embeds = module.tables.index_select(0, prompt_ids).to(embed_dtype)
    return embeds, module.prompt_mask.index_select(0, prompt_ids).to(mask_dtype)
