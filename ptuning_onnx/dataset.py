"""Training data: JSONL rows -> validated, tokenised examples -> padded batches.

Rows, one JSON object per line (blank lines are skipped; row numbers are 1-based line numbers):

    causal-lm    {"text"} | {"prompt", "completion"} (loss on the completion only) | {"input_ids"[, "labels"]}
    seq-cls      {"text", "label"} | {"input_ids", "label"}              label: str or int
    token-cls    {"tokens": [words], "labels": [one per word]} | {"input_ids", "labels": [one per id, null = skip]}
    seq2seq-lm   {"source", "target"} | {"input_ids", "target_ids" (or "labels")}

Every problem is found here, before any training step, and raised as a :class:`DataError` naming the file, the row
and the problem. Sequence limits count the virtual tokens, because the prompt occupies positions 0..n-1.

This module is named ``dataset`` rather than ``data`` because ``ptuning_onnx/data/`` is the package of shipped
datasets, and a package shadows a module of the same name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .config import TASK_TO_CLI, TaskType
from .errors import ConfigError, DataError

IGNORE = -100  # label id that cross-entropy skips (transformers' convention)
# Files whose presence means the base folder ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
# transformers uses a huge sentinel (VERY_LARGE_INTEGER) for "no limit".
_NO_LIMIT = 10 ** 9
_FIELDS = {
    TaskType.CAUSAL_LM: "'text', or 'prompt' and 'completion', or 'input_ids'",
    TaskType.SEQ_CLS: "'text' (or 'input_ids') and 'label'",
    TaskType.TOKEN_CLS: "'tokens' and 'labels' (or 'input_ids' and 'labels')",
    TaskType.SEQ_2_SEQ_LM: "'source' and 'target' (or 'input_ids' and 'target_ids')",
}


@dataclass
class BaseInfo:
    """What validation needs to know about the base model, read without loading its weights."""

    vocab_size: int
    max_length: Optional[int]  # positions the model allows, virtual tokens included; None = no limit
    pad_id: int
    tokenizer: Any = None  # a transformers tokenizer, or None when the folder has no tokenizer files
    eos_id: Optional[int] = None


@dataclass
class Example:
    """One validated row. ``labels`` is a class index (seq-cls) or per-token ids with -100 = no loss."""

    row: int
    input_ids: list
    labels: Union[int, list]


@dataclass
class TaskData:
    path: Path
    task: TaskType
    examples: list
    labels: Optional[list] = None  # class names (seq-cls / token-cls), index = class id

    def __len__(self) -> int:
        return len(self.examples)


def load_tokenizer(base_dir: Union[str, os.PathLike]):
    """``AutoTokenizer`` for ``base_dir`` when it ships tokenizer files, else None (pre-tokenized rows only)."""
    folder = Path(base_dir)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def inspect_base(base_dir: Union[str, os.PathLike]) -> BaseInfo:
    """Vocabulary size, position limit, pad id and tokenizer of a base model folder (config + tokenizer only)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
        tokenizer = load_tokenizer(base_dir)
    except (OSError, ValueError) as exc:  # transformers' wording for unreadable config/tokenizer files
        raise ConfigError(f"cannot read base model {base_dir}: {' '.join(str(exc).split())}") from None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None and tokenizer is not None and tokenizer.model_max_length < _NO_LIMIT:
        limit = tokenizer.model_max_length  # relative-position models (T5): the tokenizer's advertised limit
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if pad is None:
        pad = config.pad_token_id if config.pad_token_id is not None else 0  # masked out, so any id works
    eos = tokenizer.eos_token_id if tokenizer is not None else getattr(config, "eos_token_id", None)
    return BaseInfo(vocab_size=config.vocab_size, max_length=limit, pad_id=pad, tokenizer=tokenizer,
                    eos_id=eos if isinstance(eos, int) else None)


def read_jsonl(path: Union[str, os.PathLike]) -> list:
    """``[(row_number, object), ...]``; invalid JSON, non-objects and an empty file are DataErrors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(obj).__name__}")
            rows.append((number, obj))
    if not rows:
        raise DataError(f"{path}: file is empty (no rows)")
    return rows


def collect_labels(path: Union[str, os.PathLike], task: TaskType) -> list:
    """The label set of a train file: strings sorted, ints ascending. Mixed types are an error."""
    task = TaskType(task)
    found: set = set()
    for number, obj in read_jsonl(path):
        if task == TaskType.SEQ_CLS:
            values = [_field(obj, "label", path, number, task)]
        else:
            values = _field(obj, "labels", path, number, task)
            if not isinstance(values, list):
                raise DataError(f"{path}: row {number}: 'labels' must be a list, got {type(values).__name__}")
            values = [v for v in values if v is not None]  # null = a position without a label
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{path}: row {number}: label {value!r} must be a string or an integer")
            if found and type(value) is not type(next(iter(found))):
                raise DataError(f"{path}: row {number}: label {value!r} mixes strings and integers; use one type")
            found.add(value)
    labels = sorted(found)
    if task == TaskType.SEQ_CLS and len(labels) < 2:
        # transformers treats num_labels == 1 as regression, which is not what a label column means.
        raise DataError(f"{path}: seq-cls needs at least 2 distinct labels, found {labels}")
    return labels


def load_task_data(path: Union[str, os.PathLike], task: Union[str, TaskType], base: BaseInfo, *,
                   num_virtual_tokens: int, labels: Optional[list] = None, template=None) -> TaskData:
    """Read, validate and tokenise a JSONL file. ``labels`` (from the train file) is required for seq-cls and
    token-cls; a label outside it is an error naming the row. ``template``: a parsed template (template.py) that
    builds each row's ids from its fields (template_data.py); then ``num_virtual_tokens`` is its leading slot's."""
    task = TaskType(task)
    path = Path(path)
    if task not in _FIELDS:
        raise DataError(f"training task {task.value} is not supported; expected one of: "
                        + ", ".join(TASK_TO_CLI[t] for t in _FIELDS))
    label_ids = {name: i for i, name in enumerate(labels or [])}
    examples = []
    for number, obj in read_jsonl(path):
        ctx = _Row(path, number, task, base, label_ids)
        if template is not None:
            from .template_data import parse_row

            ids, target = parse_row(ctx, obj, template)  # ids may hold placeholders past the vocabulary
        else:
            ids, target = ctx.parse(obj)
            ctx.check_ids(ids, "input_ids")
        ctx.check_length(len(ids), num_virtual_tokens)
        if task == TaskType.SEQ_2_SEQ_LM:
            ctx.check_ids(target, "target ids")
            ctx.check_length(len(target), 0, what="target")
        examples.append(Example(row=number, input_ids=ids, labels=target))
    return TaskData(path=path, task=task, examples=examples, labels=list(labels) if labels is not None else None)


def _field(obj: dict, name: str, path, number: int, task: TaskType):
    if name not in obj:
        raise DataError(f"{path}: row {number}: missing field '{name}' ({TASK_TO_CLI[task]} rows need "
                        f"{_FIELDS[task]})")
    return obj[name]


class _Row:
    """Parses one row for one task; every error carries file and row."""

    def __init__(self, path: Path, number: int, task: TaskType, base: BaseInfo, label_ids: dict):
        self.path, self.number, self.task, self.base, self.label_ids = path, number, task, base, label_ids

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.path}: row {self.number}: {problem}")

    def field(self, obj: dict, name: str):
        return _field(obj, name, self.path, self.number, self.task)

    def text(self, obj: dict, name: str) -> str:
        value = self.field(obj, name)
        if not isinstance(value, str):
            raise self.error(f"'{name}' must be a string, got {type(value).__name__}")
        if not value.strip() and name != "prompt":
            raise self.error(f"'{name}' is empty")
        return value

    def tokenizer(self):
        if self.base.tokenizer is None:
            raise self.error("has text but the base model folder has no tokenizer files; "
                             "give pre-tokenized 'input_ids' instead")
        return self.base.tokenizer

    def encode(self, text: str, special: bool = True) -> list:
        return list(self.tokenizer()(text, add_special_tokens=special)["input_ids"])

    def label(self, value) -> int:
        if isinstance(value, bool) or value not in self.label_ids:
            known = ", ".join(map(repr, self.label_ids))
            raise self.error(f"unknown label {value!r}; the train file's labels are: {known}")
        return self.label_ids[value]

    def parse(self, obj: dict) -> tuple:
        """(input_ids, labels) for this row."""
        pretok = "input_ids" in obj
        ids = self.ids(obj["input_ids"], "input_ids") if pretok else None
        if self.task == TaskType.CAUSAL_LM:
            if pretok:
                labels = self.ids(obj["labels"], "labels", allow_ignore=True) if "labels" in obj else list(ids)
                if len(labels) != len(ids):
                    raise self.error(f"{len(ids)} input_ids but {len(labels)} labels")
                return ids, labels
            if "prompt" in obj or "completion" in obj:
                prompt = self.encode(self.text(obj, "prompt"))
                completion = self.encode(self.text(obj, "completion"), special=False)
                if self.base.eos_id is not None:
                    completion.append(self.base.eos_id)  # so the prompt learns where a completion stops
                return prompt + completion, [IGNORE] * len(prompt) + completion
            ids = self.encode(self.text(obj, "text"))
            return ids, list(ids)
        if self.task == TaskType.SEQ_CLS:
            label = self.label(self.field(obj, "label"))
            return (ids if pretok else self.encode(self.text(obj, "text"))), label
        if self.task == TaskType.SEQ_2_SEQ_LM:
            if pretok:
                key = "target_ids" if "target_ids" in obj else "labels"
                return ids, self.ids(self.field(obj, key), key)
            return self.encode(self.text(obj, "source")), self.encode(self.text(obj, "target"))
        return self.token_cls(obj, ids)

    def token_cls(self, obj: dict, ids: Optional[list]) -> tuple:
        labels = self.field(obj, "labels")
        if not isinstance(labels, list):
            raise self.error(f"'labels' must be a list, got {type(labels).__name__}")
        if ids is not None:
            if len(labels) != len(ids):
                raise self.error(f"{len(ids)} input_ids but {len(labels)} labels")
            return ids, [IGNORE if v is None else self.label(v) for v in labels]
        words = self.field(obj, "tokens")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise self.error("'tokens' must be a non-empty list of strings")
        if len(labels) != len(words):
            raise self.error(f"{len(words)} tokens but {len(labels)} labels")
        word_labels = [IGNORE if v is None else self.label(v) for v in labels]
        tokenizer = self.tokenizer()
        if not getattr(tokenizer, "is_fast", False):
            raise self.error("token-cls text rows need a fast tokenizer (for word_ids); give 'input_ids' instead")
        enc = tokenizer(words, is_split_into_words=True)
        out, previous = [], None
        # Only a word's first sub-token carries its label; the others, and special tokens, get no loss.
        for word in enc.word_ids():
            out.append(IGNORE if word is None or word == previous else word_labels[word])
            previous = word
        return list(enc["input_ids"]), out

    def ids(self, value, name: str, allow_ignore: bool = False) -> list:
        if not isinstance(value, list) or not value:
            raise self.error(f"'{name}' must be a non-empty list of integers")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.error(f"'{name}'[{i}] is {v!r}, not an integer")
            if allow_ignore and v == IGNORE:
                continue
            if v < 0 or v >= self.base.vocab_size:
                raise self.error(f"'{name}'[{i}] = {v} is outside the vocabulary [0, {self.base.vocab_size})")
        return list(value)

    def check_ids(self, ids: list, name: str) -> None:
        if not ids:
            raise self.error(f"{name} are empty after tokenisation")
        bad = [v for v in ids if v != IGNORE and not 0 <= v < self.base.vocab_size]
        if bad:  # a tokenizer larger than the model's embedding matrix
            raise self.error(f"{name} contain id {bad[0]}, outside the vocabulary [0, {self.base.vocab_size})")

    def check_length(self, length: int, virtual: int, what: str = "input") -> None:
        limit = self.base.max_length
        if limit is None or length + virtual <= limit:
            return
        if virtual:
            raise self.error(f"{length} tokens + {virtual} virtual tokens = {length + virtual} > model limit {limit}")
        raise self.error(f"{what} has {length} tokens > model limit {limit}")


def collate(examples: list, task: Union[str, TaskType], *, pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of :class:`Example` into tensors.

    Returns ``input_ids`` and ``attention_mask`` (B, T) and ``labels``: (B,) class ids for seq-cls, else (B, T)
    for causal-lm/token-cls or (B, T_target) for seq2seq-lm, -100 on padding. Causal-LM pads on the left (the
    reference is batch-invariant, and generation continues from the right edge); a decoder classifier that pools
    the last position needs left padding too, which the caller chooses with ``padding_side``.
    """
    import torch

    task = TaskType(task)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    def pad(seqs: list, value: int) -> "torch.Tensor":
        width = max(len(s) for s in seqs)
        rows = [([value] * (width - len(s)) + s) if padding_side == "left" else (s + [value] * (width - len(s)))
                for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    ids = [list(e.input_ids) for e in examples]
    batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}
    if task == TaskType.SEQ_CLS:
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
    elif task == TaskType.SEQ_2_SEQ_LM:
        # Targets always pad on the right: the decoder reads them left to right from its start token.
        width = max(len(e.labels) for e in examples)
        batch["labels"] = torch.tensor([list(e.labels) + [IGNORE] * (width - len(e.labels)) for e in examples],
                                       dtype=torch.long)
    else:
        batch["labels"] = pad([list(e.labels) for e in examples], IGNORE)
    return batch
