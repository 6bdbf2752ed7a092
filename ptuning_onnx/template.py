"""P-tuning templates (Liu et al., "GPT Understands, Too"): virtual tokens anywhere, around fixed anchor words.

    <p:4> {text} <p:3> It was            4 virtual tokens, the row's "text", 3 virtual tokens, the anchor "It was"
    <p:2> {premise} ? <p:2> {hypothesis}

- ``<p:k>`` inserts k virtual tokens (k >= 1). All slots of a template share ONE prompt encoder: the virtual tokens
  are numbered 0..n-1 across the slots, left to right, and the encoder produces them as one sequence.
- ``{field}`` inserts a field of the input row (a JSONL key); names are identifiers.
- Everything else is literal text: anchor tokens, real vocabulary tokens that stay fixed. ``{{`` and ``}}`` are
  literal braces. Each piece (anchor text, field value) is tokenized on its own, so no token straddles two
  pieces; text that is only whitespace (around a slot, or between two fields) adds no token.

Torch-free (the runtime applies templates too). A rendered row is token ids where each virtual token is a
placeholder id ``vocab_size + k``: the graph maps ids >= vocab_size to row k of the baked prompt table, the way
TensorRT-LLM handles prompt tables. Only the template's own slots may hold placeholder ids (``check_inputs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from .errors import ConfigError

MAX_VIRTUAL_TOKENS = 512
_TOKEN = re.compile(r"<p:([^>]*)>|\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(ConfigError):
    """A malformed template, a row without a field the template needs, or misplaced placeholder ids."""


@dataclass(frozen=True)
class Virtual:
    count: int
    first: int  # index of this slot's first virtual token among all the template's virtual tokens


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Text:
    text: str


Segment = Union[Virtual, Field, Text]


@dataclass(frozen=True)
class Template:
    source: str
    segments: tuple

    @property
    def num_virtual_tokens(self) -> int:
        return sum(s.count for s in self.segments if isinstance(s, Virtual))

    @property
    def fields(self) -> tuple:
        """Field names in order of first use."""
        return tuple(dict.fromkeys(s.name for s in self.segments if isinstance(s, Field)))

    @property
    def prefix_only(self) -> bool:
        """``<p:n> {field}``: exactly PEFT's prefix P-tuning (no anchors, one field, one leading slot)."""
        kinds = [type(s) for s in self.segments if not (isinstance(s, Text) and not s.text.strip())]
        return kinds == [Virtual, Field]

    @property
    def leading(self) -> int:
        """Virtual tokens of a slot that opens the template (0 if it opens with text or a field). They go before
        everything, the model's own special tokens included, exactly where PEFT's prefix goes (and a causal-lm
        export keeps their keys/values precomputed); the other slots are placeholders inside the input."""
        first = next((s for s in self.segments if not (isinstance(s, Text) and not s.text.strip())), None)
        return first.count if isinstance(first, Virtual) else 0

    @property
    def inline_slots(self) -> tuple:
        """(first, count) of each slot that is not the leading one, in order."""
        slots = tuple((s.first, s.count) for s in self.segments if isinstance(s, Virtual))
        return slots[1:] if self.leading else slots

    def inputs(self, row: dict, encode: Callable[[str], Sequence[int]], vocab_size: int,
               special: tuple = ((), ())) -> list:
        """The ids a model (or an exported graph) takes for ``row``: the rendered template WITHOUT its leading slot
        (the model puts that in front itself), inside the model's special tokens ``special = (prefix, suffix)``
        (see ``special_tokens``). Inline virtual tokens are placeholders ``vocab_size + k``."""
        ids, _ = self.render(row, encode, vocab_size)
        return [*special[0], *ids[self.leading:], *special[1]]

    def check_inputs(self, ids: Sequence[int], vocab_size: int, where: Optional[str] = None) -> None:
        """``ids`` (one row's real tokens, as ``inputs`` makes them) must hold each inline slot's placeholders, in
        order and together, and no placeholder anywhere else. Raises ``TemplateError`` naming the position."""
        prefix = f"{where}: " if where else ""
        found = [(i, int(t)) for i, t in enumerate(ids) if t >= vocab_size]
        want = [vocab_size + first + k for first, count in self.inline_slots for k in range(count)]
        if [t for _, t in found] != want:
            got = [t for _, t in found]
            if len(got) > len(want) or any(t - vocab_size >= self.num_virtual_tokens or
                                           t - vocab_size < self.leading for t in got):
                seen: set = set()
                bad = found[-1]
                for i, t in found:  # the first placeholder out of place: outside the slots, or a repeat
                    if t not in want or t in seen:
                        bad = (i, t)
                        break
                    seen.add(t)
                raise TemplateError(f"{prefix}placeholder id {bad[1]} at position {bad[0]}, which is not a virtual "
                                    f"slot of the template {self.source!r} (its inline placeholders are "
                                    f"{_span(want)})")
            raise TemplateError(f"{prefix}the template {self.source!r} needs placeholders {_span(want)} in its "
                                f"slots, in order; found {_span(got) if got else 'none'}")
        k = 0
        for _first, count in self.inline_slots:
            block = [i for i, _ in found[k:k + count]]
            if block != list(range(block[0], block[0] + count)):
                raise TemplateError(f"{prefix}the {count} placeholders of one virtual slot must be adjacent, found at "
                                    f"positions {block}")
            k += count

    def render(self, row: dict, encode: Callable[[str], Sequence[int]], vocab_size: int) -> tuple[list, list]:
        """-> (ids, virtual positions): the row's tokens with each virtual token as placeholder ``vocab_size + k``.

        ``encode(text)`` tokenizes WITHOUT special tokens; the caller adds the model's own (BERT's [CLS]/[SEP]).
        Each piece is encoded on its own, so no token straddles a slot, a field and an anchor.
        """
        ids: list = []
        positions: list = []
        for segment in self.segments:
            if isinstance(segment, Virtual):
                positions += range(len(ids), len(ids) + segment.count)
                ids += [vocab_size + segment.first + k for k in range(segment.count)]
            elif isinstance(segment, Field):
                if segment.name not in row:
                    raise TemplateError(f"the row has no field {segment.name!r} (template {self.source!r} needs "
                                        f"{', '.join(self.fields)}; the row has {', '.join(sorted(row)) or 'none'})")
                value = row[segment.name]
                if not isinstance(value, str):
                    raise TemplateError(f"field {segment.name!r} must be a string, got {type(value).__name__}")
                ids += list(encode(value))
            elif segment.text.strip():
                ids += list(encode(segment.text))
        return ids, positions


def parse(source: str) -> Template:
    """Parse a template; raises ``TemplateError`` naming the problem and where it is."""
    if not isinstance(source, str) or not source.strip():
        raise TemplateError("a template must be a non-empty string, e.g. '<p:4> {text} <p:3> It was'")
    segments: list = []
    text, position, virtual = "", 0, 0

    def flush():
        nonlocal text
        if text:
            segments.append(Text(text))
        text = ""

    for match in _TOKEN.finditer(source):
        text += source[position:match.start()]
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            text += token[0]
        elif token in ("{", "}"):
            raise TemplateError(f"unbalanced {token!r} at column {match.start() + 1} of {source!r} "
                                "(write {{ or }} for a literal brace)")
        elif token.startswith("<p:"):
            count = match.group(1)
            if not re.fullmatch(r"[0-9]+", count) or int(count) < 1:
                raise TemplateError(f"{token!r} at column {match.start() + 1}: the number of virtual tokens must be "
                                    "a positive integer, as in <p:4>")
            flush()
            segments.append(Virtual(int(count), virtual))
            virtual += int(count)
        else:
            name = match.group(2).strip()
            if not _FIELD.match(name):
                raise TemplateError(f"{token!r} at column {match.start() + 1}: a field name must be an identifier "
                                    "(letters, digits, _), as in {text}")
            flush()
            segments.append(Field(name))
    text += source[position:]
    flush()
    if any(isinstance(s, Text) and "<p:" in s.text for s in segments):
        raise TemplateError(f"an unclosed '<p:' in {source!r}; write <p:k> with k virtual tokens")
    template = Template(source, tuple(segments))
    if not template.num_virtual_tokens:
        raise TemplateError(f"template {source!r} has no virtual tokens; add a <p:k> slot")
    if not template.fields:
        raise TemplateError(f"template {source!r} has no {{field}}; add the input, e.g. {{text}}")
    if template.num_virtual_tokens > MAX_VIRTUAL_TOKENS:
        raise TemplateError(f"template {source!r} has {template.num_virtual_tokens} virtual tokens; at most "
                            f"{MAX_VIRTUAL_TOKENS}")
    return template


def _span(ids: Sequence[int]) -> str:
    ids = list(ids)
    if len(ids) > 3 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}..{ids[-1]}"
    return str(ids)


def special_tokens(with_special: Sequence[int], without: Sequence[int]) -> tuple:
    """(prefix, suffix): the special tokens a tokenizer puts around a text, from one text tokenized with and
    without them (BERT: ([CLS], [SEP]); GPT-2: ((), ())). Training and the runtime both derive them this way."""
    with_special, without = list(with_special), list(without)
    for i in range(len(with_special) - len(without) + 1):
        if with_special[i:i + len(without)] == without:
            return tuple(with_special[:i]), tuple(with_special[i + len(without):])
    raise TemplateError("the tokenizer's special tokens change the text's own tokens; templates cannot wrap it")


PROBE = "hello world"  # any text: special_tokens only needs to find it inside its specials


def check_placeholders(ids: Sequence[int], positions: Sequence[int], vocab_size: int,
                       where: Optional[str] = None) -> None:
    """The j-th virtual slot (``positions[j]``) must hold placeholder ``vocab_size + j``, and no other position may
    hold an id >= vocab_size. Raises ``TemplateError`` naming the position."""
    expected = {position: vocab_size + j for j, position in enumerate(positions)}
    prefix = f"{where}: " if where else ""
    for i, token in enumerate(ids):
        want = expected.get(i)
        if want is None and token >= vocab_size:
            raise TemplateError(f"{prefix}placeholder id {token} at position {i}, which is not a virtual slot of the "
                                f"template (slots at {sorted(expected)})")
        if want is not None and token != want:
            raise TemplateError(f"{prefix}position {i} is virtual slot {want - vocab_size} and must hold {want}, "
                                f"not {token}")
