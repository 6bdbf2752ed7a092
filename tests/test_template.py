"""Templates (ptuning_onnx/template.py): the parser, its errors, rendering with a real tokenizer, placeholder checks."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from conftest import MODELS
from ptuning_onnx.template import Field, TemplateError, Text, Virtual, check_placeholders, parse


def test_slots_fields_and_anchors_in_order():
    t = parse("<p:4> {text} <p:3> It was")
    assert t.segments == (Virtual(4, 0), Text(" "), Field("text"), Text(" "), Virtual(3, 4), Text(" It was"))
    assert t.num_virtual_tokens == 7 and t.fields == ("text",) and not t.prefix_only
    nli = parse("<p:2> {premise} ? <p:2> {hypothesis}")
    assert nli.fields == ("premise", "hypothesis") and [s.first for s in nli.segments if isinstance(s, Virtual)] == [0, 2]
    assert parse("<p:5> {text}").prefix_only and parse("<p:5>{text}").prefix_only
    assert not parse("{text} <p:5>").prefix_only
    assert parse("<p:1> {{ {a} }}").segments[1] == Text(" { ")


@pytest.mark.parametrize("source,message", [
    ("", "non-empty"), ("   ", "non-empty"), ("<p:0> {text}", "positive integer"), ("<p:x> {text}", "positive"),
    ("<p:-2> {text}", "positive"), ("<p:3 {text}", "unclosed '<p:'"), ("<p:2> {text", "unbalanced '{'"),
    ("<p:2> text}", "unbalanced '}'"), ("<p:2> {1abc}", "identifier"), ("<p:2> {}", "identifier"),
    ("<p:2> {a b}", "identifier"), ("{text} It was", "no virtual tokens"), ("<p:3> It was", "no {field}"),
    ("<p:600> {text}", "at most 512"),
])
def test_malformed_templates_are_refused_with_the_reason(source, message):
    with pytest.raises(TemplateError, match=message):
        parse(source)


@pytest.fixture(scope="module")
def encode():
    tok = Tokenizer.from_file(str(MODELS / "gpt2" / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def test_render_puts_placeholders_in_the_slots_and_text_between(encode):
    t = parse("<p:2> {premise} ? <p:3> {hypothesis}")
    row = {"premise": "the cat sat", "hypothesis": "a cat is sitting"}
    ids, positions = t.render(row, encode, vocab_size=1000)
    premise, question, hypothesis = encode("the cat sat"), encode(" ? "), encode("a cat is sitting")
    assert ids == [1000, 1001, *premise, *question, 1002, 1003, 1004, *hypothesis]
    assert positions == [0, 1, *(2 + len(premise) + len(question) + k for k in range(3))]
    check_placeholders(ids, positions, 1000)
    swapped = list(ids)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # slots in the wrong order
    with pytest.raises(TemplateError, match="position 0 is virtual slot 0 and must hold 1000, not 1001"):
        check_placeholders(swapped, positions, 1000)
    stray = list(ids)
    stray[2] = 1003  # a placeholder where the premise is
    with pytest.raises(TemplateError, match="placeholder id 1003 at position 2, which is not a virtual slot"):
        check_placeholders(stray, positions, 1000, where="row 0")


def test_render_errors_name_the_field(encode):
    t = parse("<p:2> {premise} ? {hypothesis}")
    with pytest.raises(TemplateError, match="no field 'hypothesis'.*the row has premise"):
        t.render({"premise": "x"}, encode, 1000)
    with pytest.raises(TemplateError, match="must be a string, got int"):
        t.render({"premise": "x", "hypothesis": 3}, encode, 1000)


def test_leading_slot_inline_slots_and_model_inputs(encode):
    from ptuning_onnx.template import special_tokens

    t = parse("<p:3> {text} <p:2> It was")
    assert t.leading == 3 and t.inline_slots == ((3, 2),)
    assert parse("{premise} ? <p:2> {hypothesis}").leading == 0
    assert parse("{premise} ? <p:2> {hypothesis}").inline_slots == ((0, 2),)
    ids = t.inputs({"text": "the cat"}, encode, 1000, special=((7,), (8,)))
    assert ids == [7, *encode("the cat"), 1003, 1004, *encode(" It was"), 8]  # the leading slot is the model's
    t.check_inputs(ids, 1000)
    assert special_tokens([101, 5, 6, 102], [5, 6]) == ((101,), (102,)) and special_tokens([5, 6], [5, 6]) == ((), ())
    with pytest.raises(TemplateError, match="change the text's own tokens"):
        special_tokens([101, 9, 102], [5, 6])
