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


# A model without a position limit (T5's relative positions, ALiBi) still needs a cap: generate() allocates its
# (batch, max_new_tokens) output up front, so an unbounded count is a MemoryError or a hang, never an answer.
UNBOUNDED_MAX_NEW_TOKENS = 1 << 16
# The logits processors compute in float32 (as transformers does): temperature and repetition_penalty must be
# float32 numbers that are neither 0 nor inf there.
_F32 = np.finfo(np.float32)
_F32_RANGE = f"[{float(_F32.tiny):.3g}, {float(_F32.max):.3g}]"


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
            others = sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]
            raise AttentionMaskError(f"attention_mask must hold only 0 and 1, found {others}")
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
    """``length`` user tokens (padded width) plus ``max_new_tokens`` must fit ``limit`` (None: no position limit,
    and then ``max_new_tokens`` is capped at ``UNBOUNDED_MAX_NEW_TOKENS``)."""
    length, max_new_tokens = int(length), int(max_new_tokens)  # Python ints: numpy integers wrap around
    if limit is None:
        _check_cap(max_new_tokens)
    elif length + max_new_tokens > limit:
        extra = f" + max_new_tokens {max_new_tokens}" if max_new_tokens else ""
        raise SequenceLengthError(f"input length {length}{extra} = {length + max_new_tokens} exceeds the model's "
                                  f"limit of {limit} user tokens (its positions minus the virtual tokens)")


def check_new_tokens(max_new_tokens: int, limit: Optional[int]) -> None:
    """An encoder-decoder's new tokens fill the decoder's own positions: at most ``limit`` (None: the cap)."""
    max_new_tokens = int(max_new_tokens)
    if limit is None:
        _check_cap(max_new_tokens)
    elif max_new_tokens > limit:
        raise SequenceLengthError(f"max_new_tokens {max_new_tokens} exceeds the decoder's limit of {limit} positions")


def _check_cap(max_new_tokens: int) -> None:
    if max_new_tokens > UNBOUNDED_MAX_NEW_TOKENS:
        raise SequenceLengthError(f"max_new_tokens {max_new_tokens} exceeds {UNBOUNDED_MAX_NEW_TOKENS}, the cap for a "
                                  "model without a position limit (the output is allocated as (batch, "
                                  "max_new_tokens))")


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
        # Each value is checked, then stored as a plain Python number: numpy integers wrap around (a uint64
        # max_new_tokens passed the length check as 2, -np.uint64(top_k) is huge), and np.isfinite refuses ints too
        # big for a float and Fractions.
        n = self.max_new_tokens
        if not _is_int(n) or n < 1:
            raise GenerationConfigError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise GenerationConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        t = self.temperature
        if _float32_positive(t) is None:
            raise GenerationConfigError(f"temperature must be a number in {_F32_RANGE} (> 0 and finite in float32), "
                                        f"got {t!r}")
        k = self.top_k
        if k is not None and (not _is_int(k) or k < 1):
            raise GenerationConfigError(f"top_k must be an integer >= 1 or None, got {k!r}")
        p = self.top_p
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise GenerationConfigError(f"top_p must be in (0, 1] or None, got {p!r}")
        r = self.repetition_penalty
        if r is not None and _float32_positive(r) is None:
            raise GenerationConfigError(f"repetition_penalty must be a number in {_F32_RANGE} (> 0 and finite in "
                                        f"float32) or None, got {r!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise GenerationConfigError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        normal = dict(max_new_tokens=int(n), do_sample=bool(self.do_sample), temperature=_float32_positive(t),
                      top_k=None if k is None else int(k), top_p=None if p is None else float(p),
                      repetition_penalty=None if r is None else _float32_positive(r),
                      seed=None if self.seed is None else int(self.seed))
        for name, value in normal.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


def eos_ids(value, default, vocab_size: int) -> tuple:
    """``eos_token_id``: None -> the model's; an int or ints; an empty list -> never stop early."""
    if value is None:
        value = default
    if value is None:
        return ()
    sequence = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    values = [value] if _is_int(value) else list(value) if sequence else None
    if values is None or not all(_is_int(v) and 0 <= v < vocab_size for v in values):
        raise GenerationConfigError(f"eos_token_id must be an id in [0, {vocab_size}), a list of them, or None; "
                                    f"got {value!r}")
    return tuple(int(v) for v in values)


def check_texts(texts) -> tuple[list, bool]:
    """``texts`` as a list, and whether a single string was given."""
    if isinstance(texts, str):
        _check_unicode(texts, 0)
        return [texts], True
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        for row, text in enumerate(texts):
            _check_unicode(text, row)
        return list(texts), False
    if isinstance(texts, (list, tuple)) and not texts:
        raise EmptyInputError("no texts given (an empty list)")
    raise InputError(f"texts must be a string or a non-empty list of strings, got {type(texts).__name__}")


def _check_unicode(text: str, row: int) -> None:
    # A lone surrogate ("\ud800") is a valid Python str but not Unicode text; tokenizers raises TypeError on it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"text {row} is not valid Unicode: {exc.reason} {text[exc.start:exc.end]!r} at character "
                         f"{exc.start}") from None


def _as_int_array(value, name: str, allow_bool: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputError(f"{name} must be a rectangular array: {exc}") from None
    if arr.size == 0:
        raise EmptyInputError(f"{name} is empty: shape {list(arr.shape)}")
    if arr.dtype == np.bool_ and allow_bool:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":  # not np.issubdtype(..., np.integer): that admits timedelta64 (and NaT)
        raise InputDtypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        error = TokenIdError if name == "input_ids" else AttentionMaskError
        raise error(f"{name} holds {int(arr.max())}, which does not fit int64")
    return arr.astype(np.int64, copy=False)


# numpy's timedelta64 is a numbers.Integral (NaT included, which int() refuses); a duration is not a count.
_NOT_NUMBERS = (bool, np.bool_, np.timedelta64)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, _NOT_NUMBERS)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, _NOT_NUMBERS)


def _float32_positive(value) -> Optional[float]:
    """``value`` as a float when it is a real number in float32's normal positive range, else None."""
    if not _is_real(value):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):  # an int too big for a float; a Real that will not convert
        return None
    return number if float(_F32.tiny) <= number <= float(_F32.max) else None


def check_prompt_ids(known: Optional[dict], adapter, adapters, batch: int, folder) -> Optional[np.ndarray]:
    """(B,) int64 ids for a multi-prompt folder's ``known`` ``{name: id}``, from ``adapter`` (one name for every
    row) or ``adapters`` (one per row); None for a single-adapter folder (``known`` None), which takes neither."""
    if known is None:
        if adapter is not None or adapters is not None:
            raise InputError(f"{folder} is a single-adapter export; adapter= and adapters= choose among the prompts "
                             "of a multi-prompt export")
        return None
    if (adapter is None) == (adapters is None):
        raise InputError(f"{folder} holds {len(known)} prompts ({', '.join(known)}): pass adapter='NAME' for every "
                         "row or adapters=[...] with one name per row (one of the two)")
    if adapter is not None:
        if not isinstance(adapter, str):
            raise InputError(f"adapter must be a name (str), got {type(adapter).__name__}")
        names = [adapter] * batch
    else:
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)):
            raise InputError(f"adapters must be a list of names, one per row, got {type(adapters).__name__}")
        names = list(adapters)
        if len(names) != batch:
            raise InputError(f"adapters has {len(names)} names for a batch of {batch} rows")
    unknown = sorted({str(n) for n in names if not isinstance(n, str) or n not in known})
    if unknown:
        raise InputError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; {folder} holds: {', '.join(known)}")
    return np.array([known[n] for n in names], np.int64)
