"""Decoding loops over the exported graphs, and the logits processors that pick each token.

Both loops are generators of one token column per step, so ``generate`` collects them and ``stream`` yields them.
The KV cache goes from one step's ``present.*`` straight into the next step's ``past_key_values.*`` without a copy
(device OrtValues on CUDA, onnxruntime-owned numpy buffers on CPU: see session.py); the past is never recomputed.
Graphs that take one buffer as past and present (the fused Llama graph) go further on the CPU: after the prefill
the cache lives in preallocated buffers that each step extends in place (``SharedKVCache``).
Everything here lives for one call.

Processor order follows transformers: repetition penalty, then (sampling only) temperature, top-k, top-p.
Shapes: B = batch, V = vocab, L = user tokens so far.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ..errors import PtuningError
from .session import FLOAT_TYPES, GraphRunner, SharedKVCache
from .validation import GenerationParams

_F32_MAX = np.finfo(np.float32).max


class NaNLogitsError(PtuningError, FloatingPointError):
    """The graph returned NaN logits, from which no token can be chosen."""


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids (B, L) that make left padding invisible: ``cumsum(mask) - 1``, clipped at 0."""
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)


def empty_past(session, batch: int) -> dict:
    """``past_key_values.*`` of length 0, shaped and typed as the graph declares them."""
    out = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            heads, head_dim = spec.shape[1], spec.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"graph input {spec.name} has symbolic heads/head_dim {spec.shape}")
            out[spec.name] = np.zeros((batch, heads, 0, head_dim), FLOAT_TYPES.get(spec.type, np.float32))
    return out


def _present(past_name: str) -> str:
    return past_name.replace("past_key_values", "present", 1)


class TokenChooser:
    """Turns each step's last-position logits (B, V) into tokens (B,), and tracks which rows hit EOS.

    Finished rows get ``pad_id`` from then on. The random generator is this call's own, so a seed makes the call
    reproducible whatever other threads do.
    """

    def __init__(self, params: GenerationParams, seen_ids: np.ndarray, seen_mask: np.ndarray, vocab: int,
                 pad_id: int):
        self.p, self.pad_id = params, pad_id
        self.rng = np.random.default_rng(params.seed) if params.do_sample else None
        self.eos = np.array(params.eos_token_ids, np.int64)
        batch = seen_ids.shape[0]
        self.finished = np.zeros(batch, bool)
        self.seen = None
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            # Only real tokens count as "already generated or given": padding must not change a row's result, and
            # a template's placeholders (ids >= vocab, runtime/templating.py) are no token that can come again.
            self.seen = np.zeros((batch, vocab), bool)
            rows, cols = np.nonzero((seen_mask != 0) & (seen_ids < vocab))
            self.seen[rows, seen_ids[rows, cols]] = True

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        # The penalty writes into the scores: then a copy (fp16 logits are converted either way).
        scores = np.array(logits, np.float32) if self.seen is not None else np.asarray(logits, np.float32)
        if self.p.do_sample:
            self._check_finite(scores.max(-1))  # a row's max is NaN where any of its logits is
        if self.seen is not None and scores.shape[-1] == self.seen.shape[-1]:
            penalty = np.float32(self.p.repetition_penalty)
            hit = scores[self.seen]
            # An extreme penalty overflows to +-inf, and a +inf would make the softmax NaN: clip to float32's range,
            # which keeps the order (the penalised tokens still rank last, or first for a penalty < 1).
            with np.errstate(over="ignore"):
                scores[self.seen] = np.where(hit < 0, hit * penalty, hit / penalty)
            np.clip(scores, -_F32_MAX, _F32_MAX, out=scores)
        if self.p.do_sample:
            tokens = self._sample(scores)
        else:  # argmax picks a row's first NaN when it has one: checking the picked scores finds every such row
            tokens = scores.argmax(-1)
            self._check_finite(scores[np.arange(len(tokens)), tokens])
        tokens = np.where(self.finished, self.pad_id, tokens).astype(np.int64)
        if self.seen is not None:
            live = np.flatnonzero(~self.finished)
            self.seen[live, tokens[live]] = True
        if self.eos.size:
            self.finished |= np.isin(tokens, self.eos)
        return tokens

    @staticmethod
    def _check_finite(per_row: np.ndarray) -> None:
        bad = np.isnan(per_row)
        if bad.any():
            raise NaNLogitsError(f"the graph returned NaN logits (rows {np.flatnonzero(bad).tolist()}); an fp16 "
                                 "graph may have overflowed: export fp32 or check the inputs")

    def _sample(self, scores: np.ndarray) -> np.ndarray:
        p, rng = self.p, self.rng
        if rng is None:  # __init__ makes one whenever do_sample, the only caller's condition
            raise RuntimeError("TokenChooser._sample called without do_sample")
        # Inverse CDF over each row's candidates in vocabulary order, with a threshold in (0, total]: a
        # zero-probability token can never be picked. One draw per row, as random(B).
        draws = 1.0 - rng.random((scores.shape[0],))
        tokens = np.empty(scores.shape[0], np.int64)
        for row in range(scores.shape[0]):
            ids, probs = candidates(scores[row], p.top_k, p.top_p, p.temperature)
            cumulative = np.cumsum(probs)
            pick = min(int((cumulative < draws[row] * cumulative[-1]).sum()), len(probs) - 1)
            tokens[row] = pick if ids is None else ids[pick]
        return tokens


# Nucleus sampling sorts the best tokens only: first this many, then more (by the mass still missing, at least 4x),
# then all of them.
NUCLEUS_FIRST = 256


def candidates(scores: np.ndarray, top_k: Optional[int] = None, top_p: Optional[float] = None,
               temperature: float = 1.0) -> tuple[Optional[np.ndarray], np.ndarray]:
    """One row's sampling candidates after temperature, top-k, then top-p, as transformers filters them:
    ``(ids, probs)``, the kept token ids in ascending order (None: every token, in vocabulary order) and their
    probabilities (float64, summing to 1).

    The temperature divides the shifted scores of the candidates only (it changes no order, so top-k does not need
    it): the best token sits at 0 and a tiny temperature can only push the others to -inf (probability 0).

    top-k keeps ties with the k-th score. top-p keeps the best tokens, in descending score (ties by id), up to and
    including the first whose cumulative mass reaches ``top_p``. Neither sorts the vocabulary: top-k finds its k-th
    score (``kth_largest``), and top-p sorts only the best ``NUCLEUS_FIRST`` tokens (ties with the last included),
    growing that set only while it holds less than ``top_p`` of the mass.
    """
    vocab = scores.shape[-1]
    ids: Optional[np.ndarray] = None
    if top_k is not None and top_k < vocab:
        ids = np.flatnonzero(scores >= kth_largest(scores, top_k))
    if top_p is not None and top_p < 1.0:
        pool = np.arange(vocab) if ids is None else ids
        values = scores[pool]  # ranked as given (float32 sorts faster; no temperature changes the order)
        weights = _exp_shifted(values.astype(np.float64), temperature)
        total = weights.sum()
        size = NUCLEUS_FIRST
        while True:
            if size < len(pool) // 2:  # past half the pool a partition saves nothing over the sort
                best = np.flatnonzero(values >= kth_largest(values, size))  # ties with the last included
                best = best[np.argsort(-values[best], kind="stable")]  # descending; ties keep ascending ids
            else:
                best = np.argsort(-values, kind="stable")
            mass = weights[best] / total
            through = np.cumsum(mass)
            before = through - mass  # the mass ranked above each; the first is always kept
            if len(best) == len(pool) or through[-1] >= top_p:  # any token left out has >= top_p above it
                kept = np.zeros(len(pool), bool)
                kept[best[before < top_p]] = True
                kept_weights = weights[kept]  # the pool is in ascending ids, and so are these
                return pool[kept], kept_weights / kept_weights.sum()
            # Grow by what the mass so far says is missing (a flat row holds little in its best tokens: straight
            # to the whole pool), at least 4x; a second miss sorts the whole pool, so a flat row costs at most
            # two partitions more than a plain sort, and a peaked one (most rows of a trained model) one partition.
            size = len(pool) if size > NUCLEUS_FIRST else int(size * max(4.0, 2.0 * top_p / max(float(through[-1]),
                                                                                                 1e-12)))
    weights = _exp_shifted((scores if ids is None else scores[ids]).astype(np.float64), temperature)
    return ids, weights / weights.sum()


def _exp_shifted(values: np.ndarray, temperature: float) -> np.ndarray:
    """exp((values - max) / temperature): unnormalised probabilities, in float64."""
    shifted = values - values.max()
    if temperature != 1.0:
        with np.errstate(over="ignore", divide="ignore"):
            shifted /= temperature
    return np.exp(shifted)


_BLOCK = 64


def kth_largest(values: np.ndarray, k: int):
    """The k-th largest of a 1-D array, exactly, without partitioning all of it: the k-th largest of the blocks'
    maxima is a lower bound (k values reach it), so only the few values at or above it are partitioned. Over a
    32,000-token vocabulary, ~5x faster than ``np.partition`` (which dominated a sampled step)."""
    blocks = len(values) // _BLOCK
    if blocks <= 2 * k:
        return np.partition(values, -k)[-k]
    maxima = values[: blocks * _BLOCK].reshape(blocks, _BLOCK).max(1)
    bound = np.partition(maxima, -k)[-k]
    above = values[values >= bound]  # every value >= the true k-th, and at least k of them
    return np.partition(above, -k)[-k]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def graph_inputs(session) -> set:
    """Every input name, including optional ones (an initializer of the same name), which onnxruntime lists apart
    from ``get_inputs()``."""
    return {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}


def causal_lm_steps(session, ids: np.ndarray, mask: np.ndarray, chooser: TokenChooser, max_new_tokens: int, *,
                    device: str = "cpu", device_id: int = 0, logits_to_keep: bool = True,
                    prompt_ids: Optional[np.ndarray] = None, share_buffer: bool = False) -> Iterator[np.ndarray]:
    """Yield (B,) tokens: prefill on the left-padded prompt (B, L), then one token per step through the KV cache.

    The prefill asks for the last position's logits only (``logits_to_keep=1``) when the graph has that input.
    ``prompt_ids`` (B,) int64: each row's adapter in a multi-prompt folder, fed at every step.
    ``share_buffer``: the graph takes one buffer as past and present (manifest ``model.past_present_share_buffer``);
    on the CPU the steps after the prefill then write the cache in place (``SharedKVCache``, its buffers sized once
    from the prefill's presents for the whole call). On CUDA the cache already stays on the device (GraphRunner).
    """
    runner = GraphRunner(session, device, device_id)
    cache: Optional[SharedKVCache] = None
    share_buffer = share_buffer and device == "cpu"
    names = graph_inputs(session)
    extra = {"logits_to_keep": np.array(1, np.int64)} if logits_to_keep and "logits_to_keep" in names else {}
    if prompt_ids is not None:
        extra["prompt_ids"] = prompt_ids
    feed = {"input_ids": ids, "attention_mask": mask, **empty_past(session, ids.shape[0])}
    if "position_ids" in names:
        feed["position_ids"] = positions(mask)
    past_names = [n for n in feed if n.startswith("past_key_values.")]
    ones = np.ones((ids.shape[0], 1), np.int64)
    for step in range(max_new_tokens):
        if cache is None:
            host, kept = runner.run({**feed, **extra})
            kept.update(host)
            logits = host["logits"]
        else:
            logits = cache.run({**feed, **extra})
        token = chooser(logits[:, -1])  # (B,)
        yield token
        if step == max_new_tokens - 1 or chooser.done:
            return
        if share_buffer and cache is None:  # after the prefill: buffers with room for every step still to come
            presents = {name: kept[_present(name)] for name in past_names}
            cache, kept = SharedKVCache(session, presents, max_new_tokens - 1 - step), {}
        mask = np.concatenate([mask, ones], 1)  # (B, L + step + 1); tiny next to the cache, which is never copied
        feed = {"input_ids": token[:, None], "attention_mask": mask}
        if "position_ids" in names:
            feed["position_ids"] = mask.sum(-1, keepdims=True) - 1
        if cache is None:
            feed.update({name: kept[_present(name)] for name in past_names})


def seq2seq_steps(encoder, decoder, ids: np.ndarray, mask: np.ndarray, chooser: TokenChooser, max_new_tokens: int,
                  start_id: int, *, device: str = "cpu", device_id: int = 0,
                  prompt_ids: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """Yield (B,) decoder tokens: encode (B, L) once, then decode from ``start_id`` through the decoder's cache.

    ``prompt_ids`` (B,) int64: each row's adapter in a multi-prompt folder, fed to both graphs."""
    extra = {} if prompt_ids is None else {"prompt_ids": prompt_ids}
    host, kept = GraphRunner(encoder, device, device_id).run({"input_ids": ids, "attention_mask": mask, **extra},
                                                             to_host=())
    hidden = {**host, **kept}["last_hidden_state"]  # (B, n_virtual + L, H), stays where onnxruntime put it
    runner = GraphRunner(decoder, device, device_id)
    past = empty_past(decoder, ids.shape[0])
    token = np.full((ids.shape[0],), start_id, np.int64)
    for step in range(max_new_tokens):
        host, kept = runner.run({"input_ids": token[:, None], "encoder_attention_mask": mask,
                                 "encoder_hidden_states": hidden, **extra, **past})
        kept.update(host)
        token = chooser(host["logits"][:, -1])
        yield token
        if step == max_new_tokens - 1 or chooser.done:
            return
        past = {name: kept[_present(name)] for name in past}


def collect(steps: Iterator[np.ndarray], batch: int, max_new_tokens: int, pad_id: int) -> np.ndarray:
    """Run ``steps`` to the end; (B, max_new_tokens) int64, pad after EOS and after an early stop."""
    out = np.full((batch, max_new_tokens), pad_id, np.int64)
    for index, token in enumerate(steps):
        out[:, index] = token
    return out


def chooser_for(params: GenerationParams, ids: np.ndarray, mask: np.ndarray, vocab: int, pad_id: int,
                start_id: Optional[int] = None) -> TokenChooser:
    """Causal LMs penalise repeats of the prompt's real tokens; seq2seq ones of the decoder's own (start token
    included), as transformers does."""
    if start_id is not None:
        ids = np.full((ids.shape[0], 1), start_id, np.int64)
        mask = np.ones_like(ids)
    return TokenChooser(params, ids, mask, vocab, pad_id)
