"""Parity inputs for a templated export: parity.py's random cases, with the template's inline slots in them.

Each row's real tokens hold every inline slot's placeholders (``vocab_size + k``, in order, each slot's together)
at random places among random vocabulary ids, so the check sees the graph map each placeholder to its prompt row;
the batches, lengths and padding follow parity.py's (rows 1 and 2 of a 3-row batch padded). A row's length counts
its placeholders; a length too short to hold them all grows to the shortest that does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def template_cases(entry: dict, vocab: int, limit: Optional[int], padding_side: str, seed: int,
                   batches: tuple, lengths: tuple, pad_every: Optional[int] = None):
    """Yields (input_ids, attention_mask) int64 (B, L), like parity_onnx.random_cases, for the manifest's ``template``.
    ``pad_every``: pad every that many rows (from row 0), as parity_quantized's extra rows do, in place of the
    3-row batches' rows 1 and 2."""
    rng = np.random.default_rng(seed)
    slots = [(int(first), int(count)) for first, count in entry["inline_slots"]]
    inline = sum(count for _, count in slots)
    for batch in batches:
        for length in lengths:
            length = max(length, inline + 1)
            if limit is not None and length > limit:
                continue
            ids = np.zeros((batch, length), np.int64)
            mask = np.zeros_like(ids)
            for row in range(batch):
                real = length
                if pad_every is not None and row % pad_every == 0:
                    real = max(inline + 1, length - 1 - row % length)
                elif pad_every is None and batch == 3 and row in (1, 2):
                    real = max(inline + 1, length - 3 if row == 1 else length // 2)
                tokens = _row(rng, vocab, slots, real - inline)
                start = length - real if padding_side == "left" else 0
                ids[row, start:start + real] = tokens
                mask[row, start:start + real] = 1
            yield ids, mask


def _row(rng, vocab: int, slots: list, words: int) -> list:
    """``words`` random ids with the slots' placeholder blocks inserted, in order, at random gaps."""
    text = rng.integers(0, vocab, size=words).tolist()
    cuts = sorted(rng.integers(0, words + 1, size=len(slots)).tolist())
    out, previous = [], 0
    for cut, (first, count) in zip(cuts, slots, strict=True):
        out += text[previous:cut] + [vocab + first + k for k in range(count)]
        previous = cut
    return out + text[previous:]
