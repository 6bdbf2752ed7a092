"""Property tests of the runtime's input validation: whatever a caller passes to a public call (any array of any
dtype, shape or values; lists, None, strings, bools, huge ints; any sampling parameter; any text), the call returns
a well-formed result or raises ``InputError``. Any other exception, and any numpy RuntimeWarning (overflow or NaN
inside the decoding maths: a silently wrong token), fails the property.

The models are the session's real exports of the tiny models (tests/conftest.py). Hypothesis keeps no example
database (tests write nothing into the working tree); a failure prints its example, and the bugs these properties
found are kept below as ``@example`` regressions.
"""

from __future__ import annotations

import types
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ptuning_onnx import runtime as rt
from ptuning_onnx.runtime.validation import UNBOUNDED_MAX_NEW_TOKENS

# A NaN or an overflow inside the logits processors picks a token without telling anyone: treat it as a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

PROPERTY = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TASKS = ("causal-lm", "seq2seq-lm", "seq-cls", "token-cls", "feature-extraction")


@pytest.fixture(scope="module")
def models(exports):
    return {task: rt.load(exports[task], provider="cpu", threads=1) for task in TASKS}


# ---------------------------------------------------------------- what a well-formed result is

def check_result(model, call: str, result, *, rows: int, single: bool, new_tokens: int = 0) -> None:
    """Shape, dtype and range of one call's result; ``rows`` input rows (texts or ids), ``single``: one string."""
    if isinstance(result, types.GeneratorType):
        raise AssertionError("stream results are consumed by call()")
    if call == "generate" and isinstance(result, np.ndarray):
        assert result.dtype == np.int64 and result.shape == (rows, new_tokens)
        assert ((result >= 0) & (result < model.vocab_size)).all()
    elif call == "generate":
        assert isinstance(result, str) if single else (len(result) == rows and all(isinstance(t, str) for t in result))
    elif call == "stream":
        assert len(result) <= new_tokens
        assert all(isinstance(t, str) for t in result) or all(
            isinstance(t, int) and 0 <= t < model.vocab_size for t in result)
    elif call == "classify":
        for item in [result] if single else result:
            assert isinstance(item["label"], str) and 0 <= item["score"] <= 1
            assert np.isfinite(item["logits"]).all()
        assert single or len(result) == rows
    elif call == "embed":
        assert result.dtype == np.float32 and np.isfinite(result).all()
        assert result.shape == ((64,) if single else (rows, 64))
    elif call == "tag":
        for words in [result] if single else result:
            assert all(isinstance(w["label"], str) and 0 <= w["score"] <= 1 for w in words)
    elif call == "forward":
        assert all(np.isfinite(v).all() and v.shape[0] == rows for v in result.values())


def call(model, name: str, *args, **kwargs):
    """Run a public call; a stream is consumed (its errors must come before the first token, but any that came
    later would show here too)."""
    out = getattr(model, name)(*args, **kwargs)
    return list(out) if name == "stream" else out


def refused_or_ok(fn):
    """The call's result, or None when it raised InputError; any other exception propagates and fails."""
    try:
        result = fn()
    except rt.InputError as exc:
        assert str(exc), "an InputError must say what was wrong"
        event(f"refused: {type(exc).__name__}")  # --hypothesis-show-statistics: how often each check fired
        return None
    event("answered")
    return result


# (task, call) for every public call that takes input_ids
ID_CALLS = [("causal-lm", "generate"), ("causal-lm", "stream"), ("seq2seq-lm", "generate"), ("seq2seq-lm", "stream"),
            ("seq-cls", "classify"), ("feature-extraction", "embed"), ("token-cls", "forward")]
TEXT_CALLS = [("causal-lm", "generate"), ("causal-lm", "stream"), ("seq2seq-lm", "generate"),
              ("seq2seq-lm", "stream"), ("seq-cls", "classify"), ("feature-extraction", "embed"),
              ("token-cls", "tag")]


def ids_call(model, name, ids, mask, **kw):
    if name in ("generate", "stream"):
        kw.setdefault("max_new_tokens", 2)
    if name == "forward":
        return model.forward(ids, mask)
    return call(model, name, input_ids=ids, attention_mask=mask, **kw)


# ---------------------------------------------------------------- strategies

LEAVES = (st.none() | st.booleans() | st.integers() | st.integers(-(2 ** 80), 2 ** 80) | st.floats()
          | st.text(max_size=3) | st.binary(max_size=3) | st.fractions() | st.decimals()
          | st.complex_numbers(allow_nan=True))
NESTED = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=24)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
DTYPES = (hnp.scalar_dtypes() | hnp.integer_dtypes(endianness="?") | hnp.floating_dtypes(endianness="?")
          | hnp.byte_string_dtypes(max_len=3) | hnp.unicode_string_dtypes(max_len=3) | hnp.datetime64_dtypes()
          | hnp.timedelta64_dtypes())
ANY_ARRAY = hnp.arrays(DTYPES, SHAPES) | hnp.arrays(np.dtype(object), SHAPES, elements=LEAVES)
ANYTHING = ANY_ARRAY | NESTED
NUMPY_SCALARS = hnp.arrays(hnp.scalar_dtypes(), ()).map(lambda a: a[()])
INT_DTYPES = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                              np.dtype(">i4"), np.dtype(">i8")])


@st.composite
def plausible_batches(draw, vocab: int, limit: int):
    """(ids, mask, rows) near the valid region: integer ids around [0, vocab), lengths around ``limit``, masks of
    every kind (None, left/right padded, holes, other values, other shapes, bool/float dtypes), as arrays or lists."""
    dtype = np.dtype(draw(INT_DTYPES))
    info = np.iinfo(dtype)
    rows = draw(st.integers(1, 3))
    length = draw(st.integers(1, 6) | st.integers(max(1, limit - 3), limit + 2))
    values = st.integers(max(info.min, -3), min(info.max, vocab + 2))
    if draw(st.booleans()):  # mostly valid ids, so the masks and lengths get looked at
        values = st.integers(0, min(info.max, vocab - 1))
    ids = draw(hnp.arrays(dtype, (rows, length), elements=values))
    if rows == 1 and draw(st.booleans()):
        ids = ids[0]
    kind = draw(st.sampled_from(["none", "ones", "left", "right", "holes", "junk-values", "wrong-shape", "bool",
                                 "float"]))
    shape = ids.shape
    if kind == "none":
        mask = None
    elif kind in ("ones", "bool", "float"):
        mask = np.ones(shape, {"ones": np.int64, "bool": bool, "float": np.float32}[kind])
    elif kind in ("left", "right"):
        real = draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows))
        mask = np.array([[0] * (length - r) + [1] * r if kind == "left" else [1] * r + [0] * (length - r)
                         for r in real], np.int64).reshape(shape)
    elif kind == "holes":
        mask = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 1)))
    elif kind == "junk-values":
        mask = draw(hnp.arrays(np.int64, shape, elements=st.integers(-2, 3) | st.integers(-(2 ** 63), 2 ** 63 - 1)))
    else:
        mask = draw(hnp.arrays(np.int8, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                               elements=st.integers(0, 1)))
    as_lists = draw(st.booleans())
    if as_lists:
        ids = ids.tolist()
        mask = mask.tolist() if mask is not None else None
    return ids, mask, rows


def junk_or(valid):
    """``valid`` values, or anything a caller might pass by mistake."""
    return valid | st.none() | st.booleans() | st.integers() | st.floats() | st.fractions() | st.decimals() \
        | st.text(max_size=2) | NUMPY_SCALARS | st.lists(st.integers(-2, 5), max_size=3) | hnp.arrays(np.int64, 2)


# max_new_tokens: small valid counts, or values that must be refused; never a large valid count (seq2seq has no
# position limit, so a count of 30,000 would really run 30,000 decoder steps).
NEW_TOKENS = (st.integers(1, 3) | st.integers(max_value=0) | st.integers(min_value=UNBOUNDED_MAX_NEW_TOKENS + 1)
              | st.sampled_from([np.int64(2 ** 63 - 1), np.uint64(2 ** 64 - 1), np.int8(-1), np.uint8(2), 2.0,
                                 True, None, "3", [2], Fraction(2), Decimal(2)]))
SAMPLING = st.fixed_dictionaries({}, optional={
    "do_sample": junk_or(st.booleans() | st.sampled_from([np.True_, np.False_])),
    "temperature": junk_or(st.floats(1e-3, 10) | st.floats(0, 1e-30) | st.floats(min_value=1e30)),
    "top_k": junk_or(st.integers(1, 1200) | st.sampled_from([np.uint64(5), np.int16(3)])),
    "top_p": junk_or(st.floats(0, 1) | st.floats(0, 1e-300)),
    "repetition_penalty": junk_or(st.floats(0.5, 3) | st.floats(0, 1e-30) | st.floats(min_value=1e30)),
    "eos_token_id": junk_or(st.lists(st.integers(0, 999), max_size=3) | st.integers(0, 999)),
    "seed": junk_or(st.integers(0, 2 ** 70)),
})
F32 = np.finfo(np.float32)
F32_NUMBERS = st.floats(float(F32.tiny), float(F32.max)) | st.sampled_from([float(F32.tiny), float(F32.max), 1.0])
VALID_SAMPLING = st.fixed_dictionaries({}, optional={
    "do_sample": st.booleans(), "temperature": F32_NUMBERS, "top_k": st.integers(1, 2 ** 70),
    "top_p": st.floats(0, 1, exclude_min=True), "repetition_penalty": st.none() | F32_NUMBERS,
    "eos_token_id": st.lists(st.integers(0, 999), max_size=3) | st.integers(0, 999), "seed": st.integers(0, 2 ** 70),
})
TEXT = st.text(st.characters(codec=None), max_size=12) | st.text(st.characters(), max_size=12) \
    | st.text("ab ", min_size=100, max_size=600)  # long enough to pass 128 positions
TEXTS = TEXT | st.lists(TEXT, max_size=3) | st.tuples(TEXT) | NESTED | hnp.arrays(hnp.unicode_string_dtypes(), 2)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("task,name", ID_CALLS)
@PROPERTY
@given(ids=ANYTHING, mask=st.none() | ANYTHING)
@example(ids=[[-1, 2 ** 63]], mask=None)  # numpy makes these float64: refused as a dtype, not an OverflowError
@example(ids=[[2 ** 64]], mask=None)
@example(ids=np.array([[2 ** 64 - 1]], np.uint64), mask=None)
@example(ids=[[1, 2]], mask=np.array([[2 ** 64 - 1, 1]], np.uint64))
def test_any_ids_and_mask_give_a_result_or_input_error(models, task, name, ids, mask):
    model = models[task]
    refused_or_ok(lambda: ids_call(model, name, ids, mask))


@PROPERTY
@given(ids=hnp.arrays(DTYPES.filter(lambda d: d.kind not in "iu"), SHAPES.filter(lambda s: 0 not in s))
       | hnp.arrays(np.dtype(object), hnp.array_shapes(max_dims=2, max_side=3), elements=st.integers(0, 9)),
       as_mask=st.booleans())
@example(ids=np.array([[1, 2]], "m8[s]"), as_mask=False)  # timedelta64 is a numpy integer type: was read as ids
@example(ids=np.array([[1, 1]], "m8[s]"), as_mask=True)
def test_only_integer_arrays_are_read_as_ids(models, ids, as_mask):
    """Floats, strings, dates, durations, objects: refused by dtype, whatever the values (bool only as a mask)."""
    model = models["seq-cls"]
    kw = dict(input_ids=[[1, 2]], attention_mask=ids) if as_mask else dict(input_ids=ids)  # dtype before shape
    if as_mask and ids.dtype == bool:
        return
    with pytest.raises(rt.InputDtypeError, match="integer dtype"):
        model.classify(**kw)


@pytest.mark.parametrize("task,name", ID_CALLS)
@PROPERTY
@given(data=st.data())
def test_near_valid_ids_and_masks_give_a_checked_result_or_input_error(models, task, name, data):
    model = models[task]
    ids, mask, rows = data.draw(plausible_batches(model.vocab_size, model.max_user_tokens or 130))
    result = refused_or_ok(lambda: ids_call(model, name, ids, mask))
    if result is not None:
        check_result(model, name, result, rows=rows, single=False, new_tokens=2)


@pytest.mark.parametrize("task,name", ID_CALLS)
@settings(PROPERTY, max_examples=40)
@given(data=st.data())
def test_valid_ids_are_never_refused(models, task, name, data):
    """The negative control of the properties above: ids in range, a mask the model accepts, a length that fits."""
    model = models[task]
    limit = (model.max_user_tokens or 130) - (2 if name in ("generate", "stream") else 0)
    rows = 1 if name == "stream" else data.draw(st.integers(1, 3))
    length = data.draw(st.integers(1, 6) | st.integers(limit - 2, limit))
    ids = data.draw(hnp.arrays(np.int64, (rows, length), elements=st.integers(0, model.vocab_size - 1)))
    real = data.draw(st.lists(st.integers(1, length), min_size=rows, max_size=rows))
    left = (model.required_padding or data.draw(st.sampled_from(["left", "right"]))) == "left"
    mask = np.array([[0] * (length - r) + [1] * r if left else [1] * r + [0] * (length - r) for r in real])
    result = ids_call(model, name, ids, mask)
    check_result(model, name, result, rows=rows, single=False, new_tokens=2)


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm"])
@pytest.mark.parametrize("name", ["generate", "stream"])
@settings(PROPERTY, max_examples=120)
@given(max_new_tokens=NEW_TOKENS, options=SAMPLING)
@example(max_new_tokens=np.uint64(2 ** 64 - 1), options={})  # wrapped around to 2 in the length check
@example(max_new_tokens=np.int64(2 ** 63 - 1), options={})  # wrapped around to a negative width
@example(max_new_tokens=10 ** 30, options={})  # seq2seq has no position limit: an array too big to allocate
@example(max_new_tokens=2, options={"temperature": 10 ** 400})  # np.isfinite(int too big) -> TypeError
@example(max_new_tokens=2, options={"temperature": Fraction(1, 2), "repetition_penalty": Fraction(3, 2)})
@example(max_new_tokens=2, options={"do_sample": True, "top_k": np.uint64(5)})  # -uint64 wrapped around
@example(max_new_tokens=2, options={"do_sample": True, "temperature": 1e-45})  # 0 in float32: NaN probabilities
@example(max_new_tokens=2, options={"do_sample": True, "temperature": 1e-37})  # logits / T overflowed to inf
@example(max_new_tokens=2, options={"do_sample": True, "repetition_penalty": 1e-37})  # seen logit / p -> inf
@example(max_new_tokens=2, options={"repetition_penalty": 1e300})  # inf in float32
@example(max_new_tokens=2, options={"seed": np.timedelta64("NaT", "Y")})  # a numbers.Integral that int() refuses
@example(max_new_tokens=np.timedelta64(2, "s"), options={})
def test_any_generation_parameters_give_a_result_or_input_error(models, task, name, max_new_tokens, options):
    model = models[task]
    ids = np.array([[5, 17, 200, 33]], np.int64)
    result = refused_or_ok(lambda: call(model, name, input_ids=ids, max_new_tokens=max_new_tokens, **options))
    if result is not None:
        check_result(model, name, result, rows=1, single=False, new_tokens=int(max_new_tokens))


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm"])
@settings(PROPERTY, max_examples=60)
@given(max_new_tokens=st.integers(1, 3), options=VALID_SAMPLING, rows=st.integers(1, 3))
@example(max_new_tokens=3, options={"do_sample": True, "temperature": float(F32.tiny), "repetition_penalty":
                                    float(F32.tiny)}, rows=2)
@example(max_new_tokens=3, options={"do_sample": True, "temperature": float(F32.max), "repetition_penalty":
                                    float(F32.max)}, rows=2)
def test_valid_generation_parameters_are_never_refused(models, task, max_new_tokens, options, rows):
    """Every value inside the documented ranges, extremes included, decodes without a NaN or an overflow."""
    model = models[task]
    ids = np.array([[5, 17, 200, 33]] * rows, np.int64)
    result = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, **options)
    check_result(model, "generate", result, rows=rows, single=False, new_tokens=max_new_tokens)


@pytest.mark.parametrize("task,name", TEXT_CALLS)
@PROPERTY
@given(texts=TEXTS)
@example(texts="a\ud800b")  # a lone surrogate: tokenizers raised TypeError
@example(texts=["ok", "\udfff"])
@example(texts="ab " * 200)  # past the position limit
@example(texts=[""])
def test_any_texts_give_a_result_or_input_error(models, task, name, texts):
    model = models[task]
    kw = {"max_new_tokens": 2} if name in ("generate", "stream") else {}
    result = refused_or_ok(lambda: call(model, name, texts, **kw))
    if result is not None:
        single = isinstance(texts, str)
        check_result(model, name, result, rows=1 if single else len(texts), single=single, new_tokens=2)


@PROPERTY
@given(pooling=junk_or(st.sampled_from(["mean", "cls", "max", "MEAN"])) | hnp.arrays(hnp.unicode_string_dtypes(), 2),
       normalize=junk_or(st.booleans()), texts=st.none() | st.just("good film"),
       input_ids=st.none() | st.just([[2, 5, 3]]), attention_mask=st.none() | st.just([[1, 1, 1]]))
@example(pooling=np.array(["mean", "cls"]), normalize=False, texts="a", input_ids=None, attention_mask=None)
@example(pooling="mean", normalize=np.array([1, 0]), texts="a", input_ids=None, attention_mask=None)
def test_embed_options_and_input_combinations(models, pooling, normalize, texts, input_ids, attention_mask):
    model = models["feature-extraction"]
    result = refused_or_ok(lambda: model.embed(texts, input_ids=input_ids, attention_mask=attention_mask,
                                               pooling=pooling, normalize=normalize))
    if result is not None:
        check_result(model, "embed", result, rows=1, single=texts is not None)
