"""Training rows through a template (template.py): JSONL fields in, the ids ``TemplatePTuningModel`` takes out.

A row gives the template's ``{field}``s (strings); seq-cls rows add ``label``, causal-lm rows may add ``completion``
(the target; without it every real token is one). Each piece is tokenized on its own, without special tokens, and
the model's own special tokens go around the whole (``template.special_tokens``): for a prefix-only template this
is exactly what the plain prefix mode tokenizes, so the two train the same prompt.
"""

from __future__ import annotations

from functools import lru_cache

from .config import TaskType
from .template import PROBE, Template, TemplateError, special_tokens

IGNORE = -100


@lru_cache(maxsize=8)
def _specials(tokenizer) -> tuple:
    return special_tokens(tokenizer(PROBE, add_special_tokens=True)["input_ids"],
                          tokenizer(PROBE, add_special_tokens=False)["input_ids"])


def tokenizer_specials(tokenizer) -> tuple:
    """(prefix, suffix) special ids a transformers tokenizer puts around a text."""
    return _specials(tokenizer)


def parse_row(ctx, obj: dict, template: Template) -> tuple:
    """(input_ids, labels) of one row; ``ctx`` is dataset._Row (file and row number for every error)."""
    if ctx.task not in (TaskType.SEQ_CLS, TaskType.CAUSAL_LM):
        raise ctx.error(f"templates train seq-cls and causal-lm rows, not {ctx.task.value}")
    if "input_ids" in obj:
        raise ctx.error("a template builds the ids from the row's fields; give text fields, not 'input_ids'")
    tokenizer = ctx.tokenizer()
    vocab = ctx.base.vocab_size
    for name in template.fields:
        ctx.text(obj, name)  # present, a string, not empty; the error names file, row and field

    def encode(text: str) -> list:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    try:
        ids = template.inputs(obj, encode, vocab, _specials(tokenizer))
    except TemplateError as exc:
        raise ctx.error(str(exc)) from None
    ctx.check_ids([t for t in ids if t < vocab] or [0], "input_ids")
    if ctx.task == TaskType.SEQ_CLS:
        return ids, ctx.label(ctx.field(obj, "label"))
    if "completion" in obj:
        completion = encode(ctx.text(obj, "completion"))
        if ctx.base.eos_id is not None:
            completion.append(ctx.base.eos_id)  # so the prompt learns where a completion stops
        return ids + completion, [IGNORE] * len(ids) + completion
    return ids, [t if t < vocab else IGNORE for t in ids]
