"""ptuning-serve over a multi-prompt folder: an ``adapter`` per request (OpenAI's ``model``), rows of different
adapters batched together, each answer equal to the runtime's for that adapter alone; unknown or missing adapters
are 400s that name the choices. The REAL server in a subprocess, the runtime in this process as the oracle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import MODELS, make_gpt2_adapters  # noqa: E402
from ptuning_onnx import runtime as rt  # noqa: E402
from test_serve import Server  # noqa: E402

ADAPTERS = {"news": ("MLP", 5, 0), "chat": ("LSTM", 3, 1)}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    from ptuning_onnx.export.multi import export_multi

    root = tmp_path_factory.mktemp("serve-multi")
    adapters = make_gpt2_adapters(root, ADAPTERS)
    folder = export_multi(MODELS / "gpt2", adapters, root / "multi", progress=False).path
    server = Server(folder, "--max-batch-size", "8", "--max-wait-ms", "200").wait()
    try:
        yield folder, server, rt.load(folder, provider="cpu", threads=1)
    finally:
        server.stop()


def _generate(server, body):
    return httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)


def test_rows_of_different_adapters_batch_together_and_each_equals_its_adapter_alone(multi):
    _, server, oracle = multi
    rng = np.random.default_rng(0)
    # seeded sampling: the tokens depend on the whole distribution, which the prompt moves (greedy tokens of the
    # random tiny GPT-2 repeat one id under either prompt)
    requests = [{"input_ids": [rng.integers(5, 1000, n).tolist()], "adapter": name, "max_new_tokens": 8,
                 "eos_token_id": [], "do_sample": True, "seed": seed}
                for seed, (n, name) in enumerate(zip((3, 7, 5, 2, 6, 4), ("news", "chat") * 3, strict=True))]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda body: _generate(server, body), requests))
    for body, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        want = oracle.generate(input_ids=np.array(body["input_ids"]), max_new_tokens=8, eos_token_id=[],
                               do_sample=True, seed=body["seed"], adapter=body["adapter"])[0].tolist()
        assert answer.json()["outputs"][0]["token_ids"] == want
    # the negative control: the same ids and seed under the other adapter give other tokens
    for body, answer in zip(requests, answers, strict=True):
        other = oracle.generate(input_ids=np.array(body["input_ids"]), max_new_tokens=8, eos_token_id=[],
                                do_sample=True, seed=body["seed"],
                                adapter="chat" if body["adapter"] == "news" else "news")[0].tolist()
        assert answer.json()["outputs"][0]["token_ids"] != other
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    totals: dict = {}
    for line in metrics.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"ptuning_batch_size_{part}"):
                kind = line.split('kind="')[1].split('"')[0]
                totals.setdefault(kind, {})[part] = float(line.split()[-1])
    assert any(t["sum"] > t["count"] for t in totals.values()), totals  # some step ran several rows at once


def test_openai_model_names_the_adapter_and_models_lists_them(multi):
    _, server, oracle = multi
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert sorted(m.id for m in client.models.list().data) == sorted(ADAPTERS)
    ids = [17, 42, 99, 5]
    for name in ADAPTERS:
        got = client.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0)
        want = oracle.generate(input_ids=np.array([ids]), max_new_tokens=6, adapter=name)[0]
        assert got.choices[0].text == oracle.tokenizer.decode([t for t in want.tolist() if t != oracle.pad_token_id])
    with pytest.raises(openai.BadRequestError, match="set model to one of"):
        client.completions.create(model=None, prompt=ids, max_tokens=2)  # type: ignore[arg-type]


def test_unknown_or_missing_adapter_is_a_400_naming_the_choices(multi):
    _, server, _ = multi
    missing = _generate(server, {"input_ids": [[5, 6]], "max_new_tokens": 2})
    assert missing.status_code == 400 and "news, chat" in missing.json()["error"]["message"]
    unknown = _generate(server, {"input_ids": [[5, 6]], "max_new_tokens": 2, "adapter": "sports"})
    assert unknown.status_code == 400
    assert "unknown adapter(s) 'sports'" in unknown.json()["error"]["message"]
    assert "news, chat" in unknown.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/model", timeout=10).json()["adapters"] == {"news": 0, "chat": 1}


def test_a_single_prompt_folder_refuses_an_adapter(exports):
    server = Server(exports["causal-lm"]).wait()
    try:
        answer = _generate(server, {"input_ids": [[5, 6]], "max_new_tokens": 2, "adapter": "news"})
        assert answer.status_code == 400 and "single-adapter export" in answer.json()["error"]["message"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """seq-cls and token-cls multi-prompt folders (2 and 3 labels) behind real servers, and runtime oracles."""
    from conftest import make_peft_adapter
    from ptuning_onnx.export.multi import export_multi

    root = tmp_path_factory.mktemp("serve-multi-cls")
    out = {}
    for task, peft_task, auto in (("seq-cls", "SEQ_CLS", "AutoModelForSequenceClassification"),
                                  ("token-cls", "TOKEN_CLS", "AutoModelForTokenClassification")):
        adapters = {}
        for name, (encoder, n, seed, labels) in {"sentiment": ("MLP", 5, 0, 2), "topic": ("LSTM", 3, 1, 3)}.items():
            make_peft_adapter(root / task / name, MODELS / "bert", peft_task, auto, encoder=encoder,
                              num_virtual_tokens=n, seed=seed, num_labels=labels)
            adapters[name] = root / task / name
        folder = export_multi(MODELS / "bert", adapters, root / task / "multi", progress=False).path
        out[task] = (Server(folder, "--max-batch-size", "8", "--max-wait-ms", "200"),
                     rt.load(folder, provider="cpu", threads=1))
    try:
        for server, _ in out.values():
            server.wait()
        yield out
    finally:
        for server, _ in out.values():
            server.stop()


def test_classify_and_tag_take_an_adapter_per_request(classifiers):
    """Requests of both adapters at once (batched together): each answer has its adapter's labels and equals the
    runtime's for that adapter; the other adapter's answer differs (negative control); unknown names are 400s."""
    server, oracle = classifiers["seq-cls"]
    texts = ["a good film", "bad", "the plot was thin", "fine"]
    names = ["sentiment", "topic", "topic", "sentiment"]
    bodies = [{"texts": [t], "adapter": n} for t, n in zip(texts, names, strict=True)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{server.url}/v1/classify", json=b, timeout=60), bodies))
    for text, name, answer in zip(texts, names, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = answer.json()["results"][0]
        want = oracle.classify(text, adapter=name)
        other = oracle.classify(text, adapter="topic" if name == "sentiment" else "sentiment")
        assert len(got["logits"]) == {"sentiment": 2, "topic": 3}[name] and got["label"] == want["label"]
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5)
        assert len(other["logits"]) != len(got["logits"])
    info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert info["adapter_labels"] == {"sentiment": ["LABEL_0", "LABEL_1"], "topic": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    assert info["labels"] is None  # no labels shared by every adapter
    bad = httpx.post(f"{server.url}/v1/classify", json={"texts": ["x"], "adapter": "nope"}, timeout=10)
    assert bad.status_code == 400 and "sentiment, topic" in bad.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/classify", json={"texts": ["x"]}, timeout=10).status_code == 400

    server, oracle = classifiers["token-cls"]
    for name, other in (("topic", "sentiment"), ("sentiment", "topic")):
        answer = httpx.post(f"{server.url}/v1/tag", json={"texts": texts[:2], "adapter": name}, timeout=60)
        assert answer.status_code == 200, answer.text
        want = oracle.tag(texts[:2], adapter=name)
        got = answer.json()["results"]
        assert [[(w["word"], w["label"]) for w in row] for row in got] == \
            [[(w["word"], w["label"]) for w in row] for row in want]
        np.testing.assert_allclose([w["score"] for row in got for w in row],
                                   [w["score"] for row in want for w in row], atol=1e-5)
        wrong = oracle.tag(texts[:2], adapter=other)
        assert not np.allclose([w["score"] for row in got for w in row],
                               [w["score"] for row in wrong for w in row], atol=1e-3)
    bad = httpx.post(f"{server.url}/v1/tag", json={"texts": ["x"], "adapter": "nope"}, timeout=10)
    assert bad.status_code == 400 and "sentiment, topic" in bad.json()["error"]["message"]
