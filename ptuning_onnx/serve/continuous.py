"""Continuous batching for causal LMs on CPU: rows join the running batch between decoding steps and leave it when
they finish, instead of waiting for a whole batch to end.

New rows are prefilled together (left-padded, empty past), pick their first token, and are merged into the running
batch: both KV caches are left-padded to a common length with masked zeros, so every row stays a left-padded row,
which the export's parity proved gives what the row gives alone (``padding_invariant``). Positions come from each
row's own mask. Finished rows are cut out of the batch, and columns that no row attends to any more are trimmed.
Each row keeps its own ``TokenChooser`` (seed, penalty), so its tokens are those of the request alone.

Shapes: B rows, P cached positions, H heads, D head dim. A traced graph caches the user's tokens only (it adds the
virtual tokens inside); a fused Llama graph caches the prompt's n positions first, and trimming and padding happen
after those (``_Running._lead``).
"""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..runtime import generation as gen
from ..runtime.session import SharedKVCache

if TYPE_CHECKING:
    from .batcher import Batcher


class _Running:
    """The batch being decoded: rows, their choosers, the KV cache (name -> (B, H, P, D)), mask (B, P), last tokens."""

    def __init__(self, rows: list, choosers: list, past: dict, mask: np.ndarray, last: np.ndarray,
                 prompts: Optional[np.ndarray] = None):
        self.rows, self.choosers, self.past, self.mask, self.last = rows, choosers, past, mask, last
        self.prompts = prompts  # (B,) prompt ids of a multi-prompt folder, fed at every step; else None
        # Graphs that take one buffer as past and present: the buffers the steps write in place, made at the first
        # step after the rows changed (a join or a leave re-lays the cache out, and the buffers with it).
        self.cache: Optional[SharedKVCache] = None

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, index: list) -> None:
        """Keep rows ``index`` only, then drop the leading columns no kept row attends to."""
        self.rows = [self.rows[i] for i in index]
        self.choosers = [self.choosers[i] for i in index]
        self.cache = None
        self.mask, self.last = self.mask[index], self.last[index]
        if self.prompts is not None:
            self.prompts = self.prompts[index]
        self.past = {name: value[index] for name, value in self.past.items()}
        used = np.flatnonzero(self.mask.any(0))
        start = int(used[0]) if used.size else self.mask.shape[1]
        if start:
            self.past = {name: np.concatenate([value[:, :, :lead], value[:, :, lead + start:]], 2)
                         for name, value in self.past.items() for lead in [self._lead(value)]}
            self.mask = self.mask[:, start:]

    def _lead(self, value: np.ndarray) -> int:
        """Cache positions before the user's: the prompt's, where the graph keeps them in the cache (a fused
        Llama graph does; a traced graph keeps them inside and this is 0)."""
        return value.shape[2] - self.mask.shape[1]

    def merge(self, other: "_Running") -> None:
        self.cache = None
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.past = {name: np.concatenate([_left_after(value, self._lead(value), width),
                                           _left_after(other.past[name], other._lead(other.past[name]), width)])
                     for name, value in self.past.items()}
        self.rows, self.choosers = self.rows + other.rows, self.choosers + other.choosers
        self.mask = np.concatenate([_left(self.mask, width, 1), _left(other.mask, width, 1)])
        self.last = np.concatenate([self.last, other.last])
        if self.prompts is not None and other.prompts is not None:
            self.prompts = np.concatenate([self.prompts, other.prompts])

    def steps_left(self) -> int:
        """The most steps any row may still take."""
        return max(r.params.max_new_tokens - len(r.tokens) for r in self.rows)

    def length_needed(self) -> int:
        """Cached width plus the most steps any row may still take: what the model's positions must hold."""
        return self.mask.shape[1] + self.steps_left()


def _left_after(value: np.ndarray, lead: int, width: int) -> np.ndarray:
    """A cache (B, H, lead + P, D) left-padded to lead + ``width`` positions after its ``lead`` ones."""
    if not lead:
        return _left(value, width, 2)
    return np.concatenate([value[:, :, :lead], _left(value[:, :, lead:], width, 2)], 2)


def _left(value: np.ndarray, width: int, axis: int) -> np.ndarray:
    missing = width - value.shape[axis]
    if not missing:
        return value
    pad = [(0, 0)] * value.ndim
    pad[axis] = (missing, 0)
    return np.pad(value, pad)


class Continuous:
    """The worker loop of a ``Batcher`` over a causal LM on CPU (called on the batcher's thread)."""

    def __init__(self, batcher: "Batcher"):
        self.b = batcher
        self.model = batcher.model
        self.session = self.model.sessions["model"]
        self.names = gen.graph_inputs(self.session)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.pending: list = []  # rows taken from the queue that did not fit yet
        self.limit = self.model.max_user_tokens
        self.share_buffer = bool(getattr(self.model, "share_kv_buffer", False))  # CausalLM's manifest entry

    def run(self) -> None:
        running: Optional[_Running] = None
        stop = False
        while not (stop and running is None and not self.pending):
            room = self.b.max_batch_size - (len(running) if running else 0)
            new, stop = self._take(room, wait=running is None, stop=stop)
            joined = None
            try:
                if new:
                    joined = self._prefill(new, running)
                    if joined is not None:
                        if running is None:
                            running = joined
                        elif len(joined):  # rows all answered at their first token leave the cache as it is
                            running.merge(joined)
                if running is not None and len(running):
                    self._decode(running)
            except Exception as exc:  # a fault between the runs: answer every row (a 500), keep serving
                for batch in (running, joined):
                    for row in batch.rows if batch is not None else ():
                        row.emit("error", row.index, exc)
                running = None
            if running is not None and not len(running):
                running = None

    # ---------------------------------------------------------------- rows in
    def _take(self, room: int, wait: bool, stop: bool) -> tuple:
        """Up to ``room`` live rows: rows that did not fit before, alone (first come, first served: a long row is
        not overtaken for ever by short ones), else the queue (blocking for the first when idle, then up to
        max_wait for companions)."""
        if self.pending:
            for row in [r for r in self.pending if r.cancelled]:  # a client that left frees its place in line
                row.emit("done", row.index, None)
            self.pending = [r for r in self.pending if not r.cancelled]
        if self.pending:
            waiting, self.pending = self.pending[:room], self.pending[room:]
            return waiting, stop
        rows: list = []
        deadline = None
        while len(rows) < room and not stop:
            try:
                if wait and not rows:
                    row = self.b._queue.get()
                    deadline = time.monotonic() + self.b.max_wait
                elif deadline is not None and deadline > time.monotonic():
                    row = self.b._queue.get(timeout=deadline - time.monotonic())
                else:
                    row = self.b._queue.get_nowait()
            except queue.Empty:
                break
            if row is None:
                stop = True
                break
            if row.cancelled:
                row.emit("done", row.index, None)
                continue
            rows.append(row)
        self.b.on_queue(self.b._queue.qsize() + len(self.pending))
        return rows, stop

    def _prefill(self, rows: list, running: Optional[_Running]) -> Optional[_Running]:
        """Run the new rows' prompts together; returns them as a running batch (rows done after one token are
        answered and left out), or None."""
        from .batcher import _pad, _RowsChooser, prompt_ids

        # The merged cache's width plus the most steps left must fit the model's positions, as in a static batch
        # (each row fits alone: checked on entry). A row that does not fit waits until the running rows have left.
        if self.limit is not None:
            width = running.mask.shape[1] if running is not None else 0
            steps = running.length_needed() - width if running is not None else 0
            fits: list = []
            for row in rows:
                group = fits + [row]
                needed = max(width, *(len(r.ids) for r in group)) + max(steps, *(r.params.max_new_tokens
                                                                                  for r in group))
                if needed <= self.limit or (running is None and not fits):
                    fits.append(row)
                else:
                    self.pending.append(row)
            rows = fits
            if not rows:
                return None
        ids, mask = _pad([r.ids for r in rows], self.model.pad_token_id, "left")
        feed = {"input_ids": ids, "attention_mask": mask, **gen.empty_past(self.session, len(rows))}
        if "position_ids" in self.names:
            feed["position_ids"] = gen.positions(mask)
        if "logits_to_keep" in self.names:
            feed["logits_to_keep"] = np.array(1, np.int64)
        prompts = prompt_ids(self.model, rows)
        if prompts is not None:
            feed["prompt_ids"] = prompts
        try:
            self.b.on_batch("prefill", len(rows))
            out = dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
            chooser = _RowsChooser(self.model, rows, ids, mask, self.b.on_tokens)
            tokens = chooser(out["logits"][:, -1])
        except Exception as exc:  # reported to the requests (a 500 with a message); the worker goes on
            for row in rows:
                row.emit("error", row.index, exc)
            return None
        past = {name: out[name.replace("past_key_values", "present", 1)] for name in self.past_names}
        batch = _Running(rows, chooser.choosers, past, mask, tokens, prompts)
        self._finish(batch, chooser.reasons)
        return batch

    # ---------------------------------------------------------------- one step for every running row
    def _decode(self, batch: _Running) -> None:
        from .batcher import choose_tokens

        mask = np.concatenate([batch.mask, np.ones((len(batch), 1), np.int64)], 1)  # (B, P + 1)
        feed = {"input_ids": batch.last[:, None], "attention_mask": mask}
        if "position_ids" in self.names:
            feed["position_ids"] = mask.sum(-1, keepdims=True) - 1
        if batch.prompts is not None:
            feed["prompt_ids"] = batch.prompts
        try:
            self.b.on_batch("generate", len(batch))
            if self.share_buffer:
                if batch.cache is None:  # room for every step any row may still take
                    batch.cache = SharedKVCache(self.session, batch.past, batch.steps_left())
                logits = batch.cache.run(feed)[:, -1]  # (B, V)
                batch.past = batch.cache.past()
            else:
                out = dict(zip(self.output_names, self.session.run(self.output_names, {**feed, **batch.past}),
                               strict=True))
                logits = out["logits"][:, -1]
                batch.past = {name: out[name.replace("past_key_values", "present", 1)] for name in self.past_names}
        except Exception as exc:
            for row in batch.rows:
                row.emit("error", row.index, exc)
            batch.keep([])
            return
        reasons: list = [None] * len(batch)
        tokens, produced = choose_tokens(self.model, batch.rows, batch.choosers, logits, reasons)
        self.b.on_tokens(produced)
        batch.mask, batch.last = mask, tokens
        self._finish(batch, reasons)

    def _finish(self, batch: _Running, reasons: list) -> None:
        from .batcher import _finish

        keep = []
        for i, (row, reason) in enumerate(zip(batch.rows, reasons, strict=True)):
            if reason is None and not row.cancelled:
                keep.append(i)
            elif reason == "failed":
                continue  # its error is out
            elif reason == "cancelled" or row.cancelled:
                row.emit("done", row.index, None)
            else:
                row.emit("done", row.index, _finish(self.model, row, reason))
        if len(keep) < len(batch):
            batch.keep(keep)
