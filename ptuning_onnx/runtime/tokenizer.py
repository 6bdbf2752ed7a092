"""The exported folder's ``tokenizer.json`` through the ``tokenizers`` library (no transformers).

Special tokens are whatever ``tokenizer.json``'s post-processor adds (BERT's [CLS]/[SEP], Llama's <s>, T5's </s>).
Padding side and pad id come from the manifest, so batches are padded the way the graphs were verified.
Text is never truncated: a too-long text is an error, not a silently shortened input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .validation import EmptyInputError, InputError


class NoTokenizerError(InputError):
    """Text was given to an export that has no ``tokenizer.json``."""


@dataclass
class Batch:
    """Tokenized texts. ``input_ids``/``attention_mask``: int64 (batch, sequence); ``offsets``: per row, per token,
    (start, end) character spans; ``word_ids``: per row, per token, the word index or None (special/padding)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    offsets: list
    word_ids: list


class TextTokenizer:
    def __init__(self, path: Path, *, padding_side: str, pad_id: int):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        pad_token = self._tok.id_to_token(pad_id) or ""
        # The tokenizer object is configured once here and only read afterwards, so calls may run concurrently.
        self._tok.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token)
        self.padding_side, self.pad_id = padding_side, pad_id
        self._byte_ids: Optional[frozenset] = None  # byte_fallback_ids(), at the first text_stream()

    def encode(self, texts: list) -> Batch:
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        for row, enc in enumerate(encodings):
            if not any(enc.attention_mask):
                raise EmptyInputError(f"text {row} ({texts[row]!r}) gives no tokens")
        return Batch(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int64),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
            offsets=[e.offsets for e in encodings],
            word_ids=[e.word_ids for e in encodings],
        )

    def encode_plain(self, text: str) -> list:
        """One text's ids without special tokens (a template's pieces, runtime/templating.py)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows, skip_special_tokens: bool = True) -> list:
        return self._tok.decode_batch([[int(i) for i in row] for row in rows], skip_special_tokens=skip_special_tokens)

    def text_stream(self) -> "TextStream":
        if self._byte_ids is None:
            self._byte_ids = byte_fallback_ids(self._tok)
        return TextStream(self._tok, self._byte_ids)


def byte_fallback_ids(tokenizer) -> frozenset:
    """The ``<0xNN>`` ids of a tokenizer whose decoder has ByteFallback (Llama-2, Mistral, TinyLlama), with its
    special ids, else none. That decoder turns a run of such tokens into text as a whole: a run that stops being
    valid UTF-8 becomes one U+FFFD per byte, so text already decoded from the run's first bytes can change. Special
    tokens are skipped before the decoder sees them, so they do not end a run."""
    if "ByteFallback" not in repr(tokenizer.decoder):
        return frozenset()
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    return frozenset(special | {i for token, i in tokenizer.get_vocab().items()
                                if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token)})


class TextStream:
    """The text of a growing list of generated tokens, one piece per token, at a constant cost per token.

    Decoding the whole list at every step, to diff it against what was sent, costs O(n) per token (0.36 ms per row
    and step at 2,048 tokens on this machine): tokenizers' ``DecodeStream`` decodes a few tokens around the new one
    instead. Text is held back (the piece is "") while it may still change: a byte-level token that ends inside a
    UTF-8 character, and a run of byte-fallback tokens until a token that decodes to text closes it. ``finish`` gives
    what is still held back, so that the pieces add up to ``decode`` of all the tokens.
    """

    def __init__(self, tokenizer, byte_ids: frozenset = frozenset()):
        from tokenizers.decoders import DecodeStream

        self._tok, self._stream, self._byte_ids = tokenizer, DecodeStream(skip_special_tokens=True), byte_ids
        self._vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        self._run: list[int] = []  # byte-fallback tokens of a run still open
        self.tokens: list[int] = []
        self.text = ""  # the pieces given so far

    def add(self, token: int) -> str:
        token = int(token)
        self.tokens.append(token)
        self._run.append(token)
        if token in self._byte_ids or (self._byte_ids and not 0 <= token < self._vocab):  # ids decode skips
            return ""
        ids, self._run = self._run, []
        piece = self._step(ids)
        self.text += piece
        return piece

    def _step(self, ids: list) -> str:
        if self._stream is not None:
            try:
                return self._stream.step(self._tok, ids if len(ids) > 1 else ids[0]) or ""
            except TypeError:  # a tokenizers without list steps (< 0.22): a broken install, not a decoding fault
                raise
            except Exception:  # a decoder that changed text already given ("Invalid prefix"): decode whole lists
                self._stream = None
        whole = self._tok.decode(self.tokens, skip_special_tokens=True)
        if whole.endswith("\ufffd") or not whole.startswith(self.text):
            return ""
        return whole[len(self.text):]

    def finish(self) -> str:
        whole = self._tok.decode(self.tokens, skip_special_tokens=True)
        rest = whole[len(self.text):] if whole.startswith(self.text) else ""
        self.text += rest
        return rest


def load_tokenizer(folder: Path, manifest: dict, pad_id: int) -> Optional[TextTokenizer]:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    return TextTokenizer(path, padding_side=manifest["model"].get("padding_side") or "right", pad_id=pad_id)


def require(tokenizer: Optional[TextTokenizer], folder) -> TextTokenizer:
    if tokenizer is None:
        raise NoTokenizerError(f"{folder} has no tokenizer.json; pass input_ids instead of text")
    return tokenizer
