"""Dynamic batching: rows from concurrent requests are gathered for up to ``max_wait_ms`` into batches of up to
``max_batch_size`` and run together on one worker thread (onnxruntime already uses every core for one run).

A request is split into rows (one per prompt); each row carries its own decoding parameters, seed, stop strings and
token limit, and gets its own ``TokenChooser``: a row's random draws and repetition penalty depend on the row alone,
so with the runtime's padding invariance each row's answer equals what it gets when sent alone. A row is finished
on EOS, a stop string, its own ``max_new_tokens``, or when its client went away (``cancel()``); the batch's decoding
loop ends when every row has finished.

Rows report to the event loop of the request that made them through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import numpy as np

from ..runtime import generation as gen
from ..runtime.model import CausalLM, RuntimeModel, Seq2SeqLM
from ..runtime.tokenizer import TextStream
from ..runtime.validation import GenerationParams

GENERATE, CLASSIFY, TAG, EMBED = "generate", "classify", "tag", "embed"
# Set to 1 to run causal LMs in whole batches too (rows wait for the batch's end), e.g. to compare the two.
STATIC_ENV = "PTUNING_SERVE_STATIC_BATCHES"


@dataclass(eq=False)
class Row:
    """One prompt of one request. ``ids``: the user's tokens (L,) int64, already validated; ``text``: for ``tag``.

    ``events``: the request's asyncio queue; it receives ``("token", index, token_id, text_piece)`` while streaming,
    then ``("done", index, result)`` or ``("error", index, exception)``.
    """

    kind: str
    index: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    ids: Optional[np.ndarray] = None
    text: Optional[str] = None
    params: Optional[GenerationParams] = None
    stop: tuple = ()
    stream: bool = False
    options: tuple = ()  # embed: (pooling, normalize); rows are batched with rows of equal options only
    adapter: Optional[str] = None  # multi-prompt folders: this row's prompt (rows of any prompts batch together)
    cancelled: bool = False
    tokens: list = field(default_factory=list)
    sent: str = ""  # text already streamed
    decoded: Optional[TextStream] = None  # the new tokens' text so far (rows that stream or have stop strings)

    def cancel(self) -> None:
        """The client went away: the worker finishes this row at its next step (plain write, read by the worker)."""
        self.cancelled = True

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody is waiting any more
            pass


class Batcher:
    """A worker thread over one loaded model. ``submit(rows)`` from the event loop; ``close()`` stops the worker after
    the rows already queued.

    ``on_batch(kind, size)``, ``on_tokens(n)`` and ``on_queue(depth)`` are metrics hooks (called on the worker)."""

    def __init__(self, model: RuntimeModel, *, max_batch_size: int, max_wait_ms: float,
                 on_batch: Callable[[str, int], None] = lambda kind, size: None,
                 on_tokens: Callable[[int], None] = lambda n: None,
                 on_queue: Callable[[int], None] = lambda depth: None):
        self.model, self.max_batch_size, self.max_wait = model, max_batch_size, max_wait_ms / 1000.0
        self.on_batch, self.on_tokens, self.on_queue = on_batch, on_tokens, on_queue
        self._queue: queue.Queue = queue.Queue()
        target = self._work
        whole = os.environ.get(STATIC_ENV, "") not in ("", "0")
        if isinstance(model, CausalLM) and model.device == "cpu" and model.padding_invariant and not whole:
            from .continuous import Continuous

            target = Continuous(self).run  # rows join and leave between steps
        self._thread = threading.Thread(target=target, name="ptuning-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: list) -> None:
        for row in rows:
            self._queue.put(row)
        self.on_queue(self._queue.qsize())

    def close(self, timeout: Optional[float] = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline, stop = [first], time.monotonic() + self.max_wait, False
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    row = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if row is None:
                    stop = True
                    break
                batch.append(row)
            self.on_queue(self._queue.qsize())
            live = [r for r in batch if not r.cancelled]
            for group in self._groups(live):
                self._run(group)
            for row in batch:
                if row.cancelled and row not in live:
                    row.emit("done", row.index, None)
            if stop:
                return

    def _groups(self, rows: list) -> list:
        """Split a gathered batch into groups that can run as one: equal options; and for generation, a padded width
        plus the largest ``max_new_tokens`` that fits the model's positions (each row fits alone: checked on entry),
        and equal lengths where the export is not padding-invariant."""
        groups: list = []
        for row in rows:
            for group in groups:
                if group[0].options == row.options and self._fits(group + [row]):
                    group.append(row)
                    break
            else:
                groups.append([row])
        return groups

    def _fits(self, rows: list) -> bool:
        model = self.model
        if rows[0].kind == TAG:
            return True
        lengths = {len(r.ids) for r in rows}
        if not model.padding_invariant and len(lengths) > 1:
            return False
        if rows[0].kind == GENERATE and isinstance(model, CausalLM) and model.max_user_tokens is not None:
            return max(lengths) + max(r.params.max_new_tokens for r in rows) <= model.max_user_tokens
        return True

    def _run(self, rows: list) -> None:
        try:
            self.on_batch(rows[0].kind, len(rows))
            kind = rows[0].kind
            if kind == GENERATE:
                self._generate(rows)
                return
            if kind == TAG:
                results = self.model.tag([r.text for r in rows], **_adapters(rows))  # type: ignore[attr-defined]
            else:
                ids, mask = _pad([r.ids for r in rows], self.model.pad_token_id,
                                 "left" if self.model.padding_side == "left" else "right")
                if kind == CLASSIFY:
                    results = self.model.classify(input_ids=ids, attention_mask=mask,  # type: ignore[attr-defined]
                                                  **_adapters(rows))
                else:
                    pooling, normalize = rows[0].options
                    results = list(self.model.embed(input_ids=ids, attention_mask=mask,  # type: ignore[attr-defined]
                                                    pooling=pooling, normalize=normalize, **_adapters(rows)))
            for row, result in zip(rows, results, strict=True):
                row.emit("done", row.index, result)
        except Exception as exc:  # reported to each waiting request (a 500 with a message); the worker goes on
            for row in rows:  # a row that already reported "done" has its answer; the extra event is ignored
                row.emit("error", row.index, exc)

    def _generate(self, rows: list) -> None:
        model = self.model
        ids, mask = _pad([r.ids for r in rows], model.pad_token_id, model.required_padding or "left")
        # The decoding loops only call the chooser and read ``done``: the batch's chooser has that interface.
        chooser = cast(gen.TokenChooser, _RowsChooser(model, rows, ids, mask, self.on_tokens))
        longest = max(r.params.max_new_tokens for r in rows)
        if isinstance(model, Seq2SeqLM):
            steps = gen.seq2seq_steps(model.sessions["encoder_model"], model.sessions["decoder_model"], ids, mask,
                                      chooser, longest, model.decoder_start_token_id, device=model.device,
                                      device_id=model.device_id, prompt_ids=prompt_ids(model, rows))
        else:
            steps = gen.causal_lm_steps(model.sessions["model"], ids, mask, chooser, longest, device=model.device,
                                        device_id=model.device_id, prompt_ids=prompt_ids(model, rows),
                                        share_buffer=cast(CausalLM, model).share_kv_buffer)
        for _ in steps:
            pass
        for row, reason in zip(rows, cast(_RowsChooser, chooser).reasons, strict=True):
            if reason != "failed":  # a failed row has had its error
                row.emit("done", row.index, _finish(model, row, reason or "length"))


class _RowsChooser:
    """The decoding loop's token chooser for a batch: each row's own ``TokenChooser`` on its own logits (1, V)."""

    def __init__(self, model: RuntimeModel, rows: list, ids: np.ndarray, mask: np.ndarray,
                 on_tokens: Callable[[int], None]):
        start = model.decoder_start_token_id if isinstance(model, Seq2SeqLM) else None
        self.model, self.rows, self.on_tokens = model, rows, on_tokens
        self.choosers = [gen.chooser_for(r.params, ids[i:i + 1], mask[i:i + 1], model.vocab_size,
                                         model.pad_token_id, start) for i, r in enumerate(rows)]
        self.reasons: list = [None] * len(rows)  # None while running; "stop", "length", "cancelled", "failed"

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    def __call__(self, logits: np.ndarray) -> np.ndarray:  # (B, V) -> (B,)
        out, produced = choose_tokens(self.model, self.rows, self.choosers, logits, self.reasons)
        self.on_tokens(produced)
        return out


def choose_tokens(model: RuntimeModel, rows: list, choosers: list, logits: np.ndarray, reasons: list) -> tuple:
    """Each running row's next token from its own chooser on its own logits (B, V), streamed by ``_step``;
    ``reasons[i]`` becomes why row i ends ("stop", "length", "cancelled", "failed"), or stays None while it runs.
    Returns (tokens (B,), the pad id in rows that had ended; how many tokens the rows produced)."""
    out = np.full(len(rows), model.pad_token_id, np.int64)
    produced = 0
    for i, row in enumerate(rows):
        if reasons[i] is not None:
            continue
        if row.cancelled:
            reasons[i] = "cancelled"
            continue
        token = int(choosers[i](logits[i:i + 1])[0])
        out[i] = token
        row.tokens.append(token)
        reasons[i] = _step_or_fail(model, row, token)
        produced += reasons[i] != "failed"
    return out, produced


def _step_or_fail(model: RuntimeModel, row: Row, token: int) -> Optional[str]:
    """``_step``; a row whose text fails (its tokenizer) gets the error and ends alone ("failed"), the batch goes on."""
    try:
        return _step(model, row, token)
    except Exception as exc:
        row.emit("error", row.index, exc)
        return "failed"


def _step(model: RuntimeModel, row: Row, token: int) -> Optional[str]:
    """After ``token`` was appended: stream the new text, and say why the row ends ("stop", "length") or None."""
    params = row.params
    assert params is not None  # generation rows are made with their parameters
    reason = None
    if token in params.eos_token_ids:
        reason = "stop"
    elif len(row.tokens) >= params.max_new_tokens:
        reason = "length"
    if not (row.stream or row.stop) or model.tokenizer is None:
        if row.stream:
            row.emit("token", row.index, token, None)
        return reason
    if row.decoded is None:
        row.decoded = model.tokenizer.text_stream()
    searched = max(0, len(row.decoded.text) - max((len(s) for s in row.stop), default=1) + 1)
    row.decoded.add(token)
    if reason:
        row.decoded.finish()  # a character that the last token left incomplete
    text = row.decoded.text
    cut = _stop_at(text, row.stop, searched)  # a stop string ending before this token's text was found earlier
    if cut is not None:
        text, reason = text[:cut], "stop"
    if row.stream:
        # Hold back a tail that may become a stop string.
        ready = text if reason else text[:len(text) - _held(text, row.stop)]
        piece = ready[len(row.sent):] if ready.startswith(row.sent) and len(ready) > len(row.sent) else ""
        row.sent = row.sent + piece
        row.emit("token", row.index, token, piece)
    return reason


def _stop_at(text: str, stops: tuple, start: int = 0) -> Optional[int]:
    """Where the first stop string starts in ``text[start:]`` (an index into ``text``), or None."""
    hits = [hit for hit in (text.find(s, start) for s in stops if s) if hit >= 0]
    return min(hits) if hits else None


def _held(text: str, stops: tuple) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _finish(model: RuntimeModel, row: Row, reason: str) -> dict:
    text = None
    if model.tokenizer is not None:
        text = model.tokenizer.decode(row.tokens)
        cut = _stop_at(text, row.stop)
        if cut is not None:
            text = text[:cut]
    return {"text": text, "token_ids": list(row.tokens), "finish_reason": reason}


def prompt_ids(model: RuntimeModel, rows: list) -> Optional[np.ndarray]:
    """(B,) int64 prompt ids of a multi-prompt folder's rows (names checked when the request came in), or None."""
    if rows[0].adapter is None or not model.adapters:
        return None
    return np.array([model.adapters[r.adapter] for r in rows], np.int64)


def _adapters(rows: list) -> dict:
    return {"adapters": [r.adapter for r in rows]} if rows[0].adapter is not None else {}


def _pad(rows: list, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of user ids -> (ids, mask) int64 (B, max L), padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask
