"""The task models that ``load(folder)`` (loader.py) returns: the shared base and the generative ones (the
encoder tasks: encoders.py). Torch-free: numpy, onnxruntime and tokenizers only.

A model object holds read-only things (sessions, tokenizer, manifest); every call builds its own feeds, bindings
and random generator, so one object serves many threads. Lengths count the USER's tokens: the graphs add the
virtual tokens inside (docs/FORMAT.md).

Calls that take ``texts`` return one result for one string and a list for a list; calls on ``input_ids`` return
arrays or lists with one row per input row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from . import generation as gen
from .templating import load_template
from .tokenizer import load_tokenizer, require
from .validation import (AttentionMaskError, GenerationParams, InputError, check_batch, check_length,
                         check_new_tokens, check_prompt_ids, check_texts, eos_ids)

STREAM_OPTIONS = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "seed",
                  "adapter"}


class RuntimeModel:
    """What every task shares: the folder, its manifest, the sessions and the tokenizer.

    Attributes: ``task``, ``providers`` ({graph: providers onnxruntime really uses}), ``device`` ("cpu"/"cuda"),
    ``vocab_size``, ``max_user_tokens`` (None: no limit), ``pad_token_id``, ``num_virtual_tokens``.
    """

    task = ""
    golden_report: Optional[dict] = None  # load(verify="golden")'s report

    def __init__(self, folder: Path, manifest: dict, sessions: dict, device: str, device_id: int):
        self.path, self.manifest = folder, manifest
        self.sessions, self.device, self.device_id = sessions, device, device_id
        self.providers = {name: list(s.get_providers()) for name, s in sessions.items()}
        cfg = manifest["model"]
        self.vocab_size = int(cfg["vocab_size"])
        self.max_user_tokens = cfg.get("max_user_tokens")
        self.num_virtual_tokens = int(manifest["num_virtual_tokens"])
        eos = _generation_eos(folder, cfg.get("eos_token_id"))
        first_eos = eos if isinstance(eos, int) or eos is None else (list(eos) or [None])[0]
        pad = cfg.get("pad_token_id")
        self.pad_token_id = int(next(v for v in (pad, first_eos, 0) if v is not None))
        self.eos_token_id = eos
        self.tokenizer = load_tokenizer(folder, manifest, self.pad_token_id)
        # A templated export (runtime/templating.py): texts are rows of fields, ids may hold the template's
        # placeholders (vocab_size + k) in its slots and nowhere else.
        self.template = load_template(manifest, self.vocab_size)
        self.id_limit = self.template.id_limit if self.template is not None else self.vocab_size
        self.padding_side = cfg.get("padding_side") or "right"
        self.padding_invariant = cfg.get("padding_invariant") is not False  # None: exported with --skip-verify
        # Multi-prompt folders (export/multi.py): {adapter name: prompt id}; None for a single-adapter export.
        adapters = manifest.get("adapters")
        self.adapters: Optional[dict] = (dict(sorted(((str(k), int(v["id"])) for k, v in adapters.items()),
                                                     key=lambda item: item[1]))  # id order (the JSON is sorted)
                                         if isinstance(adapters, dict) else None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task} from {self.path} on {self.device}>"

    # Padding a task's graphs need: causal generation keeps only the last position (left); T5-style relative
    # positions would see left padding as distance between prompt and text (right). None: either side.
    required_padding: Optional[str] = None
    new_tokens_share_positions = True  # a decoder-only model's new tokens follow the input in one sequence

    def _batch(self, texts, input_ids, attention_mask, new_tokens: int = 0):
        """-> (ids, mask) int64 (B, L) checked, the tokenizer's Batch or None, and whether one string was given."""
        if (texts is None) == (input_ids is None):
            raise InputError("pass either texts or input_ids (not both, not neither)")
        if texts is not None and attention_mask is not None:
            raise InputError("attention_mask goes with input_ids; texts are tokenized and masked here")
        encoded, single = None, False
        if texts is not None and self.template is not None:
            encoded, single = self.template.encode(require(self.tokenizer, self.path), texts)
            input_ids, attention_mask = encoded.input_ids, encoded.attention_mask
        elif texts is not None:
            texts, single = check_texts(texts)
            encoded = require(self.tokenizer, self.path).encode(texts)
            input_ids, attention_mask = encoded.input_ids, encoded.attention_mask
        ids, mask = check_batch(input_ids, attention_mask, vocab_size=self.id_limit,
                                padding_side=self.required_padding)
        if self.template is not None:
            self.template.check(ids, mask)
        if not self.padding_invariant and (mask == 0).any():
            raise AttentionMaskError(
                f"{self.path} was exported from a model whose padded rows do not give what they give alone (parity "
                "found it: sliding-window or position-dependent attention); send unpadded rows of equal length, or "
                "one row at a time")
        if self.new_tokens_share_positions:
            check_length(ids.shape[1], new_tokens, self.max_user_tokens)
        else:  # encoder-decoder: the input fills the encoder's positions, new tokens the decoder's
            check_length(ids.shape[1], 0, self.max_user_tokens)
            limit = self.max_user_tokens
            check_new_tokens(new_tokens, None if limit is None else limit + self.num_virtual_tokens)
        return ids, mask, encoded, single

    def _encoder_feed(self, ids: np.ndarray, mask: np.ndarray, prompt_ids: Optional[np.ndarray] = None) -> dict:
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in {i.name for i in self.sessions["model"].get_inputs()}:
            feed["token_type_ids"] = np.zeros_like(ids)
        if prompt_ids is not None:
            feed["prompt_ids"] = prompt_ids
        return feed

    def prompt_ids(self, adapter: Optional[str] = None, adapters=None, batch: int = 1) -> Optional[np.ndarray]:
        """(B,) int64 prompt ids of a multi-prompt folder from ``adapter`` (every row) or ``adapters`` (one name
        per row); None for a single-adapter folder, which takes neither."""
        return check_prompt_ids(self.adapters, adapter, adapters, batch, self.path)

    def forward(self, input_ids, attention_mask=None, *, adapter: Optional[str] = None, adapters=None) -> dict:
        """Raw graph outputs for checked ids (B, L): ``{output name: array}``, user positions only.

        causal-lm: ``logits`` (B, L, V) for every position (empty past); encoder tasks: their one graph.
        ``adapter`` / ``adapters``: a multi-prompt folder's prompt for every row / for each row.
        """
        if "model" not in self.sessions:
            raise InputError(f"forward() runs single-graph tasks; {self.task} has {sorted(self.sessions)}")
        ids, mask, _, _ = self._batch(None, input_ids, attention_mask)
        session = self.sessions["model"]
        feed = self._encoder_feed(ids, mask, self.prompt_ids(adapter, adapters, ids.shape[0]))
        if self.task == "causal-lm":
            feed = {**feed, **gen.empty_past(session, ids.shape[0])}
            if "position_ids" in gen.graph_inputs(session):  # absent where the model has no positions (ALiBi)
                feed["position_ids"] = gen.positions(mask)
        names = [o.name for o in session.get_outputs() if not o.name.startswith("present.")]
        return dict(zip(names, session.run(names, feed), strict=True))


class _Generative(RuntimeModel):
    """``generate`` and ``stream`` over ``_steps`` (causal-lm and seq2seq-lm)."""


    def _steps(self, ids, mask, chooser, params, prompt_ids=None) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def _chooser(self, params, ids, mask):
        return gen.chooser_for(params, ids, mask, self.vocab_size, self.pad_token_id)

    def _prepare(self, prompts, input_ids, attention_mask, max_new_tokens, kw):
        adapter, adapters = kw.pop("adapter", None), kw.pop("adapters", None)
        params = GenerationParams(max_new_tokens=max_new_tokens,
                                  eos_token_ids=eos_ids(kw.pop("eos_token_id", None), self.eos_token_id,
                                                        self.vocab_size), **kw)
        ids, mask, encoded, single = self._batch(prompts, input_ids, attention_mask, params.max_new_tokens)
        prompt_ids = self.prompt_ids(adapter, adapters, ids.shape[0])
        return params, ids, mask, encoded is not None, single, prompt_ids

    def generate(self, prompts=None, *, input_ids=None, attention_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 eos_token_id: Union[int, list, None] = None, seed: Optional[int] = None,
                 adapter: Optional[str] = None, adapters: Optional[list] = None):
        """Texts for ``prompts`` (one string -> one string), or int64 (B, max_new_tokens) new ids for ``input_ids``.

        Greedy unless ``do_sample``. ``eos_token_id``: None -> the model's; ``[]`` -> never stop early. Positions
        after a row's EOS hold the pad id. Causal batches are left-padded; each row gives what it gives alone.
        Multi-prompt folders: ``adapter="NAME"`` for every row, or ``adapters=[...]`` with one name per row.
        """
        params, ids, mask, texts, single, prompt_ids = self._prepare(
            prompts, input_ids, attention_mask, max_new_tokens,
            dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, seed=seed, adapter=adapter,
                 adapters=adapters))
        chooser = self._chooser(params, ids, mask)
        tokens = gen.collect(self._steps(ids, mask, chooser, params, prompt_ids), ids.shape[0],
                             params.max_new_tokens, self.pad_token_id)
        if not texts:
            return tokens
        decoded = require(self.tokenizer, self.path).decode_batch(tokens)
        return decoded[0] if single else decoded

    def stream(self, prompt=None, *, input_ids=None, attention_mask=None, max_new_tokens: int = 20, **kwargs):
        """A generator for ONE prompt: text pieces for ``prompt``, token ids (int) for ``input_ids``.

        Same keywords as ``generate``; it stops after EOS (an EOS id is yielded, EOS text is not). Inputs are checked
        here, before the generator is returned.
        """
        unknown = sorted(set(kwargs) - STREAM_OPTIONS)
        if unknown:
            raise InputError(f"stream() got unknown option(s) {', '.join(unknown)}; "
                             f"expected: {', '.join(sorted(STREAM_OPTIONS))}")
        kwargs.setdefault("eos_token_id", None)
        params, ids, mask, texts, _, prompt_ids = self._prepare(prompt, input_ids, attention_mask, max_new_tokens,
                                                                kwargs)
        if ids.shape[0] != 1:
            raise InputError(f"stream() takes one prompt, got a batch of {ids.shape[0]}; use generate()")
        chooser = self._chooser(params, ids, mask)
        steps = self._steps(ids, mask, chooser, params, prompt_ids)
        return self._text_pieces(steps, params) if texts else self._ids(steps)

    @staticmethod
    def _ids(steps) -> Iterator[int]:
        for token in steps:
            yield int(token[0])

    def _text_pieces(self, steps, params) -> Iterator[str]:
        text = require(self.tokenizer, self.path).text_stream()
        for token in steps:
            piece = text.add(token[0])
            if piece:
                yield piece
            if text.tokens[-1] in params.eos_token_ids:
                break
        rest = text.finish()  # a character that the last token left incomplete
        if rest:
            yield rest


class CausalLM(_Generative):
    task = "causal-lm"
    required_padding = "left"

    @property
    def share_kv_buffer(self) -> bool:
        """The graph takes one buffer as past and present (export/build_llama.py); older folders lack the key."""
        return bool(self.manifest["model"].get("past_present_share_buffer", False))

    def _steps(self, ids, mask, chooser, params, prompt_ids=None):
        return gen.causal_lm_steps(self.sessions["model"], ids, mask, chooser, params.max_new_tokens,
                                   device=self.device, device_id=self.device_id, prompt_ids=prompt_ids,
                                   share_buffer=self.share_kv_buffer)


class Seq2SeqLM(_Generative):
    task = "seq2seq-lm"
    required_padding = "right"
    new_tokens_share_positions = False

    @property
    def decoder_start_token_id(self) -> int:
        start = self.manifest["model"].get("decoder_start_token_id")
        return int(start if start is not None else self.pad_token_id)

    def _chooser(self, params, ids, mask):
        return gen.chooser_for(params, ids, mask, self.vocab_size, self.pad_token_id, self.decoder_start_token_id)

    def _steps(self, ids, mask, chooser, params, prompt_ids=None):
        return gen.seq2seq_steps(self.sessions["encoder_model"], self.sessions["decoder_model"], ids, mask, chooser,
                                 params.max_new_tokens, self.decoder_start_token_id, device=self.device,
                                 device_id=self.device_id, prompt_ids=prompt_ids)


def _generation_eos(folder: Path, default):
    """``generation_config.json``'s eos (what transformers' ``generate`` stops on), else the manifest's."""
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            value = None
        if value is not None:
            return value
    return default
