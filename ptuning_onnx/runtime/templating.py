"""Templates in the runtime (torch-free): raw fields in, the ids a templated export's graph takes out.

A folder exported from a templated adapter records its template in the manifest (docs/FORMAT.md). Its graph takes
``input_ids`` where each inline virtual token is a placeholder ``vocab_size + k``; the leading slot is inside the
graph. ``RuntimeTemplate.encode`` renders rows (``{"text": ...}``, ``{"premise": ..., "hypothesis": ...}``, or a
plain string for a one-field template) the way training did: each piece tokenized alone, the manifest's special
tokens around the whole. ``check`` refuses placeholder ids anywhere but the template's own slots.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..template import Template, TemplateError, parse
from .tokenizer import Batch
from .validation import EmptyInputError, InputError, TokenIdError, check_texts


class PlaceholderError(TokenIdError):
    """Placeholder ids (>= vocab_size) where the template has no virtual slot, or slots without theirs."""


class RuntimeTemplate:
    """``template`` (template.Template), ``vocab_size``, ``id_limit`` (vocab_size + the template's virtual tokens:
    the ids the graph accepts), ``special`` ((prefix ids, suffix ids))."""

    def __init__(self, entry: dict, vocab_size: int):
        self.template: Template = parse(entry["source"])
        self.vocab_size = int(vocab_size)
        self.id_limit = self.vocab_size + self.template.num_virtual_tokens
        special = entry.get("special_tokens") or {}
        self.special = (tuple(special.get("prefix", ())), tuple(special.get("suffix", ())))

    def rows(self, texts) -> tuple[list, bool]:
        """``texts`` as a list of field dicts, and whether one row was given."""
        fields = self.template.fields
        if isinstance(texts, (str, dict)):
            texts, single = [texts], True
        elif isinstance(texts, (list, tuple)) and texts:
            texts, single = list(texts), False
        else:
            raise InputError(f"texts must be a row ({{field: text}}), a string, or a non-empty list of them; got "
                             f"{type(texts).__name__}")
        out = []
        for index, row in enumerate(texts):
            if isinstance(row, str):
                if len(fields) != 1:
                    raise InputError(f"row {index} is a plain string but the template {self.template.source!r} "
                                     f"takes fields {', '.join(fields)}; pass {{{', '.join(map(repr, fields))}: ...}}")
                row = {fields[0]: row}
            if not isinstance(row, dict):
                raise InputError(f"row {index} must be a dict of fields or a string, got {type(row).__name__}")
            unknown = sorted(set(row) - set(fields))
            if unknown:
                raise InputError(f"row {index} has field(s) {', '.join(map(repr, unknown))} that the template "
                                 f"{self.template.source!r} does not take (it takes {', '.join(fields)})")
            empty = [name for name in fields if isinstance(row.get(name), str) and not row[name].strip()]
            if empty:
                raise InputError(f"row {index}: field {empty[0]!r} is empty (training refuses empty fields too)")
            check_texts([row[name] for name in fields if isinstance(row.get(name), str)] or [""])
            out.append(row)
        return out, single

    def encode(self, tokenizer, texts) -> tuple[Batch, bool]:
        """Render and pad rows -> (Batch, single); padding side and pad id are the tokenizer's (the manifest's)."""
        rows, single = self.rows(texts)
        encoded = []
        for index, row in enumerate(rows):
            try:
                ids = self.template.inputs(row, tokenizer.encode_plain, self.vocab_size, self.special)
            except TemplateError as exc:
                raise InputError(f"row {index}: {exc}") from None
            if not any(t < self.vocab_size for t in ids):
                raise EmptyInputError(f"row {index} ({row!r}) gives no tokens")
            encoded.append(ids)
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), width), tokenizer.pad_id, np.int64)
        mask = np.zeros_like(input_ids)
        for index, ids in enumerate(encoded):
            start = width - len(ids) if tokenizer.padding_side == "left" else 0
            input_ids[index, start:start + len(ids)] = ids
            mask[index, start:start + len(ids)] = 1
        return Batch(input_ids=input_ids, attention_mask=mask, offsets=[], word_ids=[]), single

    def check(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Each row's real tokens hold the inline slots' placeholders, in order, and none elsewhere."""
        for row in range(ids.shape[0]):
            try:
                self.template.check_inputs(ids[row][mask[row] != 0].tolist(), self.vocab_size, where=f"row {row}")
            except TemplateError as exc:
                raise PlaceholderError(str(exc)) from None
            if (ids[row][mask[row] == 0] >= self.vocab_size).any():
                raise PlaceholderError(f"row {row}: a padding position holds a placeholder id")


def load_template(manifest: dict, vocab_size: int) -> Optional[RuntimeTemplate]:
    """The manifest's ``template`` entry, checked: a malformed one is a ``ManifestError`` naming what is wrong."""
    from ..errors import ManifestError

    entry = manifest.get("template")
    if not entry:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        raise ManifestError("the manifest's template entry has no template source string")
    try:
        template = RuntimeTemplate(entry, vocab_size)
    except (TemplateError, TypeError, ValueError) as exc:
        raise ManifestError(f"the manifest's template entry is malformed: {exc}") from None
    base = entry.get("placeholder_base", vocab_size)
    if base != vocab_size:
        raise ManifestError(f"the manifest's template places placeholders at {base}, not at the vocabulary's end "
                            f"({vocab_size})")
    return template
