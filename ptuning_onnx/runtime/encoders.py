"""The encoder tasks' models: ``classify`` (seq-cls), ``tag`` (token-cls), ``embed`` (feature-extraction)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .. import manifest as mf
from ..errors import ManifestError
from . import generation as gen
from .model import RuntimeModel
from .validation import InputError

POOLINGS = ("mean", "cls")


class _Labelled(RuntimeModel):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        id2label = self.manifest["model"].get("id2label") or _config(self.path).get("id2label") or {}
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.multi_label = _config(self.path).get("problem_type") == "multi_label_classification"
        # Multi-prompt folders: each adapter's own labels, {prompt id: {index: name}}; the graph pads every row's
        # logits to the largest count (docs/FORMAT.md), and each row is cut to its adapter's here.
        self.adapter_labels: Optional[dict] = None
        self.adapter_counts: dict = {}
        if self.adapters is not None:
            entries = self.manifest["adapters"].values()
            self.adapter_labels = {int(e["id"]): {int(k): str(v) for k, v in (e.get("id2label") or {}).items()}
                                   for e in entries}
            # The count cuts the padding, whatever names id2label gives (it may be empty): LABEL_i stands in.
            self.adapter_counts = {int(e["id"]): int(e.get("num_labels") or len(e.get("id2label") or {}))
                                   for e in entries}

    def _label(self, index: int, prompt: Optional[int] = None) -> str:
        labels = self.id2label if prompt is None or self.adapter_labels is None else self.adapter_labels[prompt]
        return labels.get(index, f"LABEL_{index}")

    def _own_labels(self, logits: np.ndarray, prompt_ids: Optional[np.ndarray]) -> list:
        """[(logits of row b cut to its adapter's labels, its prompt id or None)] for (B, ..., labels) logits."""
        if prompt_ids is None or self.adapter_labels is None:
            return [(row, None) for row in logits]
        return [(row[..., :self.adapter_counts[int(p)] or None], int(p))
                for row, p in zip(logits, prompt_ids, strict=True)]

    def _scores(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        return gen._softmax(logits)


class SequenceClassifier(_Labelled):
    task = "seq-cls"

    def classify(self, texts=None, *, input_ids=None, attention_mask=None, adapter: Optional[str] = None,
                 adapters: Optional[list] = None):
        """Per row ``{"label", "score", "logits"}``: the argmax label, its probability (softmax; sigmoid for
        multi-label configs) and the raw logits (list of floats, one per label)."""
        ids, mask, _, single = self._batch(texts, input_ids, attention_mask)
        prompt_ids = self.prompt_ids(adapter, adapters, ids.shape[0])
        logits = self.sessions["model"].run(["logits"], self._encoder_feed(ids, mask, prompt_ids))[0]  # (B, labels)
        out = []
        for row, prompt in self._own_labels(logits, prompt_ids):
            best, scores = int(row.argmax()), self._scores(row)
            out.append({"label": self._label(best, prompt), "score": float(scores[best]),
                        "logits": [float(v) for v in row]})
        return out[0] if single else out


class TokenClassifier(_Labelled):
    task = "token-cls"

    def tag(self, texts, *, adapter: Optional[str] = None, adapters: Optional[list] = None):
        """Per text, one ``{"word", "start", "end", "label", "score"}`` per word (character offsets into the text);
        a word takes the label of its first sub-token."""
        ids, mask, encoded, single = self._batch(texts, None, None)
        prompt_ids = self.prompt_ids(adapter, adapters, ids.shape[0])
        full = self.sessions["model"].run(["logits"], self._encoder_feed(ids, mask, prompt_ids))[0]  # (B, L, labels)
        texts = [texts] if single else list(texts)
        out = []
        for row, (text, (logits, prompt)) in enumerate(zip(texts, self._own_labels(full, prompt_ids), strict=True)):
            scores = self._scores(logits)
            words, spans = {}, encoded.offsets[row]
            for pos, word in enumerate(encoded.word_ids[row]):
                if word is None or not mask[row, pos]:
                    continue  # special tokens and padding
                start, end = spans[pos]
                if word not in words:
                    best = int(logits[pos].argmax())
                    words[word] = {"word": "", "start": start, "end": end, "label": self._label(best, prompt),
                                   "score": float(scores[pos, best])}
                words[word]["end"] = end
            for item in words.values():
                item["word"] = text[item["start"]:item["end"]]
            out.append(list(words.values()))
        return out[0] if single else out


class FeatureExtractor(RuntimeModel):
    task = "feature-extraction"

    def embed(self, texts=None, *, input_ids=None, attention_mask=None, pooling: str = "mean",
              normalize: bool = False, adapter: Optional[str] = None, adapters: Optional[list] = None) -> np.ndarray:
        """float32 (B, hidden) (or (hidden,) for one string): ``mean`` over the real user tokens, or ``cls``, the
        first user token. Virtual tokens are never pooled (the graph does not output them)."""
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise InputError(f"normalize must be True or False, got {normalize!r}")
        ids, mask, _, single = self._batch(texts, input_ids, attention_mask)
        feed = self._encoder_feed(ids, mask, self.prompt_ids(adapter, adapters, ids.shape[0]))
        hidden = self.sessions["model"].run(["last_hidden_state"], feed)[0]  # (B, L, H)
        hidden = hidden.astype(np.float32)
        if pooling == "cls":
            first = (mask != 0).argmax(-1)  # the first real token, whichever side the padding is on
            vectors = hidden[np.arange(len(ids)), first]
        else:
            weights = mask[..., None].astype(np.float32)
            vectors = (hidden * weights).sum(1) / weights.sum(1)
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors[0] if single else vectors


def _config(folder: Path) -> dict:
    try:
        return mf.read_model_config(folder)
    except ManifestError:
        return {}
