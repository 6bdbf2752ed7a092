"""Input checks that run before any graph does: onnxruntime must never see an input it would misread.

Every failure is an ``InputError`` (a ``ValueError``) whose subclass and message name the problem and the bad value.
Why each check exists: CPU onnxruntime wraps negative ids silently (-1 reads row vocab-1) and CUDA reads zeros for
out-of-range ids, so a bad id gives a plausible wrong answer instead of an error.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import PtuningError


class InputError(PtuningError, ValueError):
    """Bad input to a runtime call."""


class InputDtypeError(InputError):
    """``input_ids`` / ``attention_mask`` are not integers."""


class TokenIdError(InputError):
    """A token id outside [0, vocab_size)."""


class EmptyInputError(InputError):
    """No rows, or a row without a single real token."""


class AttentionMaskError(InputError):
    """``attention_mask`` has the wrong shape, values other than 0/1, or the wrong padding side."""


class SequenceLengthError(InputError):
    """Prompt plus new tokens exceed the model's position limit (virtual tokens already subtracted)."""


class GenerationConfigError(InputError):
    """``max_new_tokens`` or a sampling parameter out of range."""


def check_batch(input_ids, attention_mask, *, vocab_size: int, padding_side: Optional[str] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Validate ids and mask; return them as contiguous int64 arrays of shape (batch, sequence).

    A 1-D ``input_ids`` is one row. ``attention_mask=None`` means every position is real. With
    ``padding_side="left"`` every row must be ``0...0 1...1`` (the generation prefill keeps the last position only).
    """
    ids = _as_int_array(input_ids, "input_ids")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise InputError(f"input_ids must be 1-D or 2-D (batch, sequence), got shape {list(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise EmptyInputError(f"input_ids is empty: shape {list(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
        raise TokenIdError(f"token id {bad} at position {list(where)} is outside [0, {vocab_size}) "
                           f"(the model's vocab_size)")
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = _as_int_array(attention_mask, "attention_mask", allow_bool=True)
        if mask.ndim == 1 and np.ndim(input_ids) == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise AttentionMaskError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape "
                                     f"{list(ids.shape)}")
        if not np.isin(mask, (0, 1)).all():
            bad = sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]
            raise AttentionMaskError(f"attention_mask must hold only 0 and 1, found {bad}")
        mask = mask.astype(np.int64)
    empty = np.flatnonzero(mask.sum(-1) == 0)
    if empty.size:
        raise EmptyInputError(f"row {int(empty[0])} of attention_mask has no real token (all zeros)")
    if padding_side in ("left", "right"):
        # Left-padded: the mask never drops back to 0 after a 1. Right-padded: never rises back to 1 after a 0.
        step = np.diff(mask, axis=-1)
        wrong = np.flatnonzero(((step < 0) if padding_side == "left" else (step > 0)).any(-1))
        if wrong.size:
            raise AttentionMaskError(f"row {int(wrong[0])} is not {padding_side}-padded (attention_mask "
                                     f"{mask[wrong[0]].tolist()}); this model needs padding on the {padding_side}")
    return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask)


def check_length(length: int, max_new_tokens: int, limit: Optional[int]) -> None:
    """``length`` user tokens (padded width) plus ``max_new_tokens`` must fit ``limit`` (None: no limit)."""
    if limit is not None and length + max_new_tokens > limit:
        extra = f" + max_new_tokens {max_new_tokens}" if max_new_tokens else ""
        raise SequenceLengthError(f"input length {length}{extra} = {length + max_new_tokens} exceeds the model's "
                                  f"limit of {limit} user tokens (its positions minus the virtual tokens)")


@dataclass(frozen=True)
class GenerationParams:
    """Validated decoding parameters; one per call, never shared."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    eos_token_ids: tuple = ()
    seed: Optional[int] = None

    def __post_init__(self):
        n = self.max_new_tokens
        if not _is_int(n) or n < 1:
            raise GenerationConfigError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise GenerationConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        t = self.temperature
        if not _is_real(t) or not np.isfinite(t) or t <= 0:
            raise GenerationConfigError(f"temperature must be a finite number > 0, got {t!r}")
        k = self.top_k
        if k is not None and (not _is_int(k) or k < 1):
            raise GenerationConfigError(f"top_k must be an integer >= 1 or None, got {k!r}")
        p = self.top_p
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise GenerationConfigError(f"top_p must be in (0, 1] or None, got {p!r}")
        r = self.repetition_penalty
        if r is not None and (not _is_real(r) or not np.isfinite(r) or r <= 0):
            raise GenerationConfigError(f"repetition_penalty must be a finite number > 0 or None, got {r!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise GenerationConfigError(f"seed must be a non-negative integer or None, got {self.seed!r}")


def eos_ids(value, default, vocab_size: int) -> tuple:
    """``eos_token_id``: None -> the model's; an int or ints; an empty list -> never stop early."""
    if value is None:
        value = default
    if value is None:
        return ()
    values = [value] if _is_int(value) else list(value) if isinstance(value, Sequence) else None
    if values is None or not all(_is_int(v) and 0 <= v < vocab_size for v in values):
        raise GenerationConfigError(f"eos_token_id must be an id in [0, {vocab_size}), a list of them, or None; "
                                    f"got {value!r}")
    return tuple(int(v) for v in values)


def check_texts(texts) -> tuple[list, bool]:
    """``texts`` as a list, and whether a single string was given."""
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        return list(texts), False
    if isinstance(texts, (list, tuple)) and not texts:
        raise EmptyInputError("no texts given (an empty list)")
    raise InputError(f"texts must be a string or a non-empty list of strings, got {type(texts).__name__}")


def _as_int_array(value, name: str, allow_bool: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputError(f"{name} must be a rectangular array: {exc}") from None
    if arr.size == 0:
        raise EmptyInputError(f"{name} is empty: shape {list(arr.shape)}")
    if arr.dtype == np.bool_ and allow_bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputDtypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise TokenIdError(f"{name} holds {int(arr.max())}, which does not fit int64")
    return arr.astype(np.int64, copy=False)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
