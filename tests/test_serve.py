"""ptuning-serve: the REAL server in a subprocess on a free loopback port, spoken to with httpx and the openai client.

Answers are checked against the in-process runtime (the oracle), never against what the server echoes; batching is
checked by sending the same requests alone and concurrently, with the batch-size histogram proving that they ran
together. All servers of the module start at once (their imports overlap) and are shared by the tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import ROOT  # noqa: E402
from ptuning_onnx import manifest as mf  # noqa: E402
from ptuning_onnx import runtime as rt  # noqa: E402
from ptuning_onnx.cli import serve as serve_cli  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4096
NEW_LIMIT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ptuning-serve`` as a subprocess; ``wait()`` blocks until /readyz says ready (or the process ended)."""

    def __init__(self, folder, *args, entry_point: bool = False):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).with_name("ptuning-serve")
        cmd = [str(script)] if entry_point and script.exists() else [sys.executable, "-m", "ptuning_onnx.cli.serve"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([*cmd, str(folder), "--port", str(self.port), "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def wait(self, timeout: float = 90) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(exports, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    started = {
        "causal": Server(exports["causal-lm"], "--api-key-file", str(key_file), "--max-batch-size", "8",
                         "--max-wait-ms", "50", "--max-new-tokens-limit", str(NEW_LIMIT), "--max-body-bytes",
                         str(BODY_LIMIT), entry_point=True),
        "seq-cls": Server(exports["seq-cls"], "--max-wait-ms", "50"),
        "token-cls": Server(exports["token-cls"], "--max-wait-ms", "50"),
        "feature-extraction": Server(exports["feature-extraction"], "--max-wait-ms", "50"),
        "seq2seq-lm": Server(exports["seq2seq-lm"], "--max-wait-ms", "50"),
        # The drain test's own: a request waits 1.5 s for companions, so it is surely in flight at the SIGTERM.
        "drain": Server(exports["causal-lm"], "--max-wait-ms", "1500", entry_point=True),
    }
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def causal(servers):
    return servers["causal"]


@pytest.fixture(scope="module")
def oracle(exports):
    return {task: rt.load(exports[task], provider="cpu", threads=1)
            for task in ("causal-lm", "seq-cls", "token-cls", "feature-extraction", "seq2seq-lm")}


def _post(server, path, body, headers=AUTH, **kw):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60, **kw)


def _metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _alone(model, ids, n, **kw):
    """The runtime's answer for one row, cut after its EOS (the server reports the tokens it generated)."""
    row = model.generate(input_ids=[ids], max_new_tokens=n, **kw)[0].tolist()
    eos = set(kw.get("eos_token_id") or ()) if kw.get("eos_token_id") is not None else \
        set([model.eos_token_id] if isinstance(model.eos_token_id, int) else model.eos_token_id or [])
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


# ---------------------------------------------------------------------- probes, model, torch-free
def test_probes_and_model_info(causal, servers, exports):
    assert httpx.get(f"{causal.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{causal.url}/readyz").json() == {"status": "ready", "golden": "passed"}
    manifest = json.loads((Path(exports["seq-cls"]) / mf.MANIFEST_NAME).read_text())
    info = httpx.get(f"{servers['seq-cls'].url}/v1/model").json()
    assert info["task"] == "seq-cls" and info["num_virtual_tokens"] == manifest["num_virtual_tokens"]
    assert info["dtype"] == manifest.get("dtype", "fp32") and info["providers"]["model"] == ["CPUExecutionProvider"]
    assert len(info["labels"]) == 3
    assert httpx.get(f"{causal.url}/docs").status_code == 200
    assert openai.OpenAI(base_url=f"{causal.url}/v1", api_key=KEY).models.list().data[0].object == "model"


def test_serve_package_imports_neither_torch_nor_transformers():
    code = ("import sys, ptuning_onnx.serve, ptuning_onnx.cli.serve\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("HEAVY []"), proc.stdout


# ---------------------------------------------------------------------- generation
def test_generate_equals_the_runtime(causal, oracle):
    model = oracle["causal-lm"]
    ids = [[5, 6, 7, 8], [9], list(range(20, 50))]
    out = _post(causal, "/v1/generate", {"input_ids": ids, "max_new_tokens": 9}).json()["outputs"]
    for row, got in zip(ids, out, strict=True):
        want = _alone(model, row, 9)
        assert got["token_ids"] == want
        assert got["finish_reason"] == ("length" if len(want) == 9 and want[-1] != model.eos_token_id else "stop")
        assert got["text"] == model.tokenizer.decode(want)
    sampled = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=11)
    got = _post(causal, "/v1/generate", {"prompts": "Once upon a time", "max_new_tokens": 12, **sampled}).json()
    prompt_ids = model.tokenizer.encode(["Once upon a time"]).input_ids[0].tolist()
    assert got["outputs"][0]["token_ids"] == _alone(model, prompt_ids, 12, **sampled)
    other = _post(causal, "/v1/generate", {"prompts": "Once upon a time", "max_new_tokens": 12,
                                           **{**sampled, "seed": 12}}).json()
    assert other["outputs"][0]["token_ids"] != got["outputs"][0]["token_ids"]  # the seed matters


def test_batched_answers_equal_the_answers_alone(causal):
    rng = np.random.default_rng(0)
    requests = []
    for i in range(8):
        body = {"input_ids": [rng.integers(3, 1000, size=int(rng.integers(1, 30))).tolist()],
                "max_new_tokens": int(rng.integers(4, 24)), "eos_token_id": []}
        if i % 2:
            body.update(do_sample=True, temperature=0.9, top_p=0.95, seed=i)
        if i % 3 == 0:
            body.update(repetition_penalty=1.5)
        requests.append(body)
    alone = [_post(causal, "/v1/generate", r).json()["outputs"][0] for r in requests]
    assert [len(a["token_ids"]) for a in alone] == [r["max_new_tokens"] for r in requests]

    def shared_runs() -> float:  # decoding runs that held more than one row
        return (_metric(causal, "ptuning_batch_size_count", kind="generate")
                - _metric(causal, "ptuning_batch_size_bucket", kind="generate", le="1.0"))

    # All at once, then staggered (rows join a batch that is already decoding, and leave it when done).
    for stagger in (0.0, 0.015):
        before = shared_runs()

        def send(item, stagger=stagger):
            time.sleep(item[0] * stagger)
            return _post(causal, "/v1/generate", item[1]).json()["outputs"][0]

        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(send, enumerate(requests)))
        assert together == alone, stagger
        assert shared_runs() > before, stagger  # the rows really ran together


def test_seq2seq_batches_right_padded_rows_equal_the_runtime(servers, oracle):
    model = oracle["seq2seq-lm"]
    requests = [{"input_ids": [row], "max_new_tokens": n, "eos_token_id": []}
                for row, n in (([5, 6, 7, 8, 9], 6), ([11], 9), ([12, 13], 4))]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda r: _post(servers["seq2seq-lm"], "/v1/generate", r).json(), requests))
    for r, g in zip(requests, got, strict=True):
        want = model.generate(input_ids=r["input_ids"], max_new_tokens=r["max_new_tokens"], eos_token_id=[])
        assert g["outputs"][0]["token_ids"] == want[0].tolist()


def test_stream_pieces_add_up_to_the_answer(causal):
    body = {"prompts": "The quick brown fox", "max_new_tokens": 15, "eos_token_id": []}
    whole = _post(causal, "/v1/generate", body).json()["outputs"][0]
    events = []
    with httpx.stream("POST", f"{causal.url}/v1/generate", json={**body, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    tokens = [e for e in parsed if "token_id" in e]
    assert [e["token_id"] for e in tokens] == whole["token_ids"]
    assert "".join(e["text"] for e in tokens) == whole["text"] == parsed[-1]["text"]


def test_stop_strings_across_token_boundaries(oracle):
    """The batcher's per-token step (it searches only the text that the new token can complete a stop string in)
    against a brute force over the whole decode: the row stops at the first token whose text completes the first
    stop string, its streamed pieces are the text before it, and a tail that may become a stop is held back."""
    import asyncio

    from ptuning_onnx.runtime.validation import GenerationParams
    from ptuning_onnx.serve import batcher as b

    model = oracle["causal-lm"]
    tokens = model.generate(input_ids=[[5, 6, 7]], max_new_tokens=40, eos_token_id=[])[0].tolist()
    full = model.tokenizer.decode(tokens)
    loop = asyncio.new_event_loop()
    checked = 0
    for start in range(1, len(full) - 4, 3):
        for length in (1, 2, 5):
            stop = full[start:start + length]
            if not stop.strip():
                continue
            row = b.Row(kind="generate", index=0, loop=loop, events=asyncio.Queue(), stop=(stop, "\x00"),
                        stream=True, params=GenerationParams(max_new_tokens=40, eos_token_ids=()))
            reason = None
            for token in tokens:
                row.tokens.append(token)
                reason = b._step(model, row, token)
                assert stop not in row.sent  # nothing at or past a stop was streamed
                if reason:
                    break
            cut = full.find(stop)
            assert reason == "stop" and row.sent == full[:cut]
            assert model.tokenizer.decode(row.tokens).find(stop) == cut  # it stopped at the token completing it
            assert cut + len(stop) > len(model.tokenizer.decode(row.tokens[:-1]))
            checked += 1
    loop.close()
    assert checked > 10


@pytest.mark.parametrize("static", [False, True], ids=["continuous", "static"])
def test_a_row_whose_text_fails_ends_alone(exports, oracle, static, monkeypatch):
    """Fault injection in the batchers: one row's streamed text raises (its tokenizer); that row gets the error,
    and the row decoding beside it finishes with the tokens it gets alone."""
    import asyncio

    from ptuning_onnx.runtime.validation import GenerationParams
    from ptuning_onnx.serve import batcher as b

    monkeypatch.setenv(b.STATIC_ENV, "1" if static else "0")

    model = rt.load(exports["causal-lm"], provider="cpu", threads=1)

    class Failing:  # the model's tokenizer, except that streaming text fails
        def __getattr__(self, name):
            return getattr(oracle["causal-lm"].tokenizer, name)

        def text_stream(self):
            raise RuntimeError("tokenizer fault")

    model.tokenizer = Failing()

    async def run():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        params = GenerationParams(max_new_tokens=12, eos_token_ids=())
        rows = [b.Row(kind="generate", index=i, loop=loop, events=events, ids=np.array(ids, np.int64),
                      params=params, stream=stream) for i, (ids, stream) in enumerate([([5, 6, 7], True),
                                                                                       ([8, 9], False)])]
        batcher = b.Batcher(model, max_batch_size=4, max_wait_ms=50)
        batcher.submit(rows)
        ended = {}
        while len(ended) < 2:
            kind, index, *rest = await asyncio.wait_for(events.get(), 60)
            if kind in ("done", "error"):
                ended[index] = (kind, rest[-1])
        batcher.close(timeout=10)
        return ended

    ended = asyncio.run(run())
    assert ended[0][0] == "error" and "tokenizer fault" in str(ended[0][1])
    assert ended[1][0] == "done" and ended[1][1]["token_ids"] == _alone(oracle["causal-lm"], [8, 9], 12,
                                                                        eos_token_id=[])


def test_openai_client_completions(causal, oracle):
    model = oracle["causal-lm"]
    client = openai.OpenAI(base_url=f"{causal.url}/v1", api_key=KEY, max_retries=0)
    prompt_ids = model.tokenizer.encode(["Hello there"]).input_ids[0].tolist()
    greedy = client.completions.create(model="m", prompt="Hello there", max_tokens=10, temperature=0)
    want = _alone(model, prompt_ids, 10)
    assert greedy.choices[0].text == model.tokenizer.decode(want)
    assert greedy.usage.completion_tokens == len(want) and greedy.usage.prompt_tokens == len(prompt_ids)
    sampled = client.completions.create(model="m", prompt="Hello there", max_tokens=10, temperature=0.7, top_p=0.9,
                                        seed=3)
    want = _alone(model, prompt_ids, 10, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    assert sampled.choices[0].text == model.tokenizer.decode(want)
    # stop: cut before the first occurrence, finish_reason "stop"
    full = client.completions.create(model="m", prompt="Hello there", max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="m", prompt="Hello there", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="m", prompt="Hello there", max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{causal.url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="m", prompt="x", max_tokens=2)


# ---------------------------------------------------------------------- encoder tasks
def test_classify_tag_embed_equal_the_runtime(servers, oracle):
    texts = ["a good film", "bad", "the plot was thin but the actors were fine"]
    out = _post(servers["seq-cls"], "/v1/classify", {"texts": texts}).json()["results"]
    want = oracle["seq-cls"].classify(texts)
    assert [o["label"] for o in out] == [w["label"] for w in want]
    np.testing.assert_allclose([o["logits"] for o in out], [w["logits"] for w in want], atol=1e-5)
    # concurrency: each text alone, all at once, equal to the batch above
    with ThreadPoolExecutor(3) as pool:
        alone = list(pool.map(lambda t: _post(servers["seq-cls"], "/v1/classify", {"texts": t}).json(), texts))
    np.testing.assert_allclose([a["results"][0]["logits"] for a in alone], [w["logits"] for w in want], atol=1e-5)

    tags = _post(servers["token-cls"], "/v1/tag", {"texts": texts[:2]}).json()["results"]
    want_tags = oracle["token-cls"].tag(texts[:2])
    assert [[(w["word"], w["label"]) for w in row] for row in tags] == \
        [[(w["word"], w["label"]) for w in row] for row in want_tags]

    fe = servers["feature-extraction"]
    vectors = _post(fe, "/v1/embed", {"texts": texts, "pooling": "cls"}).json()["embeddings"]
    np.testing.assert_allclose(vectors, oracle["feature-extraction"].embed(texts, pooling="cls"), atol=1e-5)
    client = openai.OpenAI(base_url=f"{fe.url}/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="m", input=texts)  # the client asks for base64 by default
    want = oracle["feature-extraction"].embed(texts, normalize=True)
    np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-5)
    plain = _post(fe, "/v1/embeddings", {"input": texts[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], atol=1e-5)
    b64 = _post(fe, "/v1/embeddings", {"input": [[5, 6, 7]], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"),
                               oracle["feature-extraction"].embed(input_ids=[[5, 6, 7]], normalize=True)[0],
                               atol=1e-5)


@pytest.mark.parametrize("server,path,body", [
    ("causal", "/v1/classify", {"texts": "x"}), ("causal", "/v1/embeddings", {"input": "x"}),
    ("seq-cls", "/v1/generate", {"prompts": "x"}), ("seq-cls", "/v1/completions", {"prompt": "x"}),
    ("feature-extraction", "/v1/tag", {"texts": "x"}), ("token-cls", "/v1/embed", {"texts": "x"}),
])
def test_unsupported_task_is_404_with_a_message(servers, server, path, body):
    r = _post(servers[server], path, body)
    assert r.status_code == 404 and "export" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- errors
def _error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert message and "Traceback" not in r.text
    return message


def test_bad_requests_get_their_codes_never_500(causal):
    url = f"{causal.url}/v1/generate"
    raw = {**AUTH, "content-type": "application/json"}
    assert "JSON" in _error(httpx.post(url, content=b'{"prompts": "x"', headers=raw), 400)
    _error(httpx.post(url, content=b"", headers=raw), 422)
    assert "max_new_tokens" in _error(_post(causal, "/v1/generate", {"prompts": "x", "max_new_tokens": "5"}), 422)
    assert "input_ids" in _error(_post(causal, "/v1/generate", {"input_ids": [[1.5]]}), 422)
    assert "input_ids" in _error(_post(causal, "/v1/generate", {"input_ids": [1, 2]}), 422)
    _error(_post(causal, "/v1/generate", {"prompts": "x", "max_new_token": 5}), 422)  # unknown field
    _error(_post(causal, "/v1/generate", ["x"]), 422)
    assert "1000" in _error(_post(causal, "/v1/generate", {"input_ids": [[1, 1000]]}), 400)
    assert "-1" in _error(_post(causal, "/v1/generate", {"input_ids": [[-1]]}), 400)
    assert "exceeds" in _error(_post(causal, "/v1/generate", {"input_ids": [[1] * 119], "max_new_tokens": 10}), 400)
    assert "limit" in _error(_post(causal, "/v1/generate", {"prompts": "x", "max_new_tokens": NEW_LIMIT + 1}), 400)
    assert "limit" in _error(_post(causal, "/v1/completions", {"prompt": "x", "max_tokens": NEW_LIMIT + 1}), 400)
    _error(_post(causal, "/v1/generate", {"prompts": "x", "max_new_tokens": 0}), 400)
    _error(_post(causal, "/v1/generate", {"prompts": "x", "temperature": -1.0, "do_sample": True}), 400)
    _error(_post(causal, "/v1/generate", {"prompts": "x", "input_ids": [[1]]}), 400)
    _error(_post(causal, "/v1/generate", {"prompts": []}), 400)
    _error(_post(causal, "/v1/generate", {"input_ids": [[]]}), 400)
    _error(_post(causal, "/v1/generate", {"input_ids": [[2 ** 70]]}), 400)
    _error(_post(causal, "/v1/completions", {"prompt": "x", "n": 2}), 400)
    # the body limit, declared and chunked (no length: the server counts)
    assert "limit" in _error(_post(causal, "/v1/generate", {"prompts": "x" * BODY_LIMIT}), 413)
    chunks = (b'{"prompts": "' + b"x" * 1000 for _ in range(6))
    _error(httpx.post(url, content=chunks, headers=raw), 413)
    # the API key
    _error(_post(causal, "/v1/generate", {"prompts": "x"}, headers={}), 401)
    _error(_post(causal, "/v1/generate", {"prompts": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    assert _post(causal, "/v1/generate", {"prompts": "x", "max_new_tokens": 1},
                 headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{causal.url}/healthz").status_code == 200  # probes need no key
    _error(httpx.get(f"{causal.url}/nowhere", headers=AUTH), 404)
    assert _metric(causal, "ptuning_requests_total", status="500") == 0
    for status in ("400", "401", "413", "422"):
        assert _metric(causal, "ptuning_request_errors_total", endpoint="/v1/generate", status=status) >= 1


def test_metrics_count_requests_tokens_and_latency(causal):
    before = {name: _metric(causal, name, **labels) for name, labels in (
        ("ptuning_requests_total", {"endpoint": "/v1/generate", "status": "200"}),
        ("ptuning_generated_tokens_total", {}),
        ("ptuning_request_latency_seconds_count", {"endpoint": "/v1/generate"}))}
    _post(causal, "/v1/generate", {"input_ids": [[4, 5], [6]], "max_new_tokens": 7, "eos_token_id": []})
    after = {name: _metric(causal, name, **labels) for name, labels in (
        ("ptuning_requests_total", {"endpoint": "/v1/generate", "status": "200"}),
        ("ptuning_generated_tokens_total", {}),
        ("ptuning_request_latency_seconds_count", {"endpoint": "/v1/generate"}))}
    assert after["ptuning_requests_total"] - before["ptuning_requests_total"] == 1
    assert after["ptuning_generated_tokens_total"] - before["ptuning_generated_tokens_total"] == 14
    assert after["ptuning_request_latency_seconds_count"] - before["ptuning_request_latency_seconds_count"] == 1
    text = httpx.get(f"{causal.url}/metrics").text
    assert "ptuning_queue_depth" in text and "ptuning_inflight_requests" in text


def test_client_disconnect_mid_stream_frees_its_slot(causal):
    before = _metric(causal, "ptuning_generated_tokens_total")
    body = {"input_ids": [[7, 8, 9]], "max_new_tokens": NEW_LIMIT - 3, "eos_token_id": [], "stream": True}
    with httpx.stream("POST", f"{causal.url}/v1/generate", json=body, headers=AUTH) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then the client goes away
    deadline = time.monotonic() + 10
    while _metric(causal, "ptuning_inflight_requests") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(causal, "ptuning_inflight_requests") == 0
    time.sleep(0.3)
    produced = _metric(causal, "ptuning_generated_tokens_total") - before
    assert 1 <= produced < NEW_LIMIT - 3, produced  # the row stopped early: its slot is free
    ok = _post(causal, "/v1/generate", {"input_ids": [[7, 8, 9]], "max_new_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["outputs"][0]["token_ids"]) >= 1


# ---------------------------------------------------------------------- CLI and lifecycle
def test_cli_refuses_bad_input_in_one_line(exports, tmp_path, capsys):
    folder = str(exports["causal-lm"])
    cases = [([str(tmp_path / "missing")], "not a folder"), ([str(tmp_path)], ""),
             ([folder, "--max-batch-size", "0"], "max-batch-size"), ([folder, "--provider", "tpu"], "provider"),
             ([folder, "--api-key-file", str(tmp_path / "nokey")], "nokey"),
             ([folder, "--max-wait-ms", "-1"], "max-wait-ms"), ([folder, "--port", "70000"], "port")]
    (tmp_path / "empty").write_text("\n")
    cases.append(([folder, "--api-key-file", str(tmp_path / "empty")], "empty"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        cases.append(([folder, "--port", str(busy.getsockname()[1])], "cannot listen"))
        for argv, words in cases:
            assert serve_cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and words in err, err


def test_golden_mismatch_exits_1_in_one_line(exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exports["causal-lm"], folder)
    with np.load(folder / mf.GOLDEN_NAME, allow_pickle=False) as data:
        golden = {name: data[name] for name in data.files}
    for name in golden:
        if name.endswith(".logits") and ".reference" in name:
            golden[name] = golden[name] + 1.0  # a golden file that agrees less, re-hashed: only the check can tell
    np.savez(folder / mf.GOLDEN_NAME, **golden)
    manifest = mf.read_manifest(folder, verify=False)
    manifest["files"] = mf.hash_files(folder, manifest["files"])
    mf.write_manifest(folder, manifest)
    server = Server(folder)
    try:
        assert server.proc.wait(60) == 1
    finally:
        server.stop()
    err = server.proc.stderr.read()
    assert "error: golden self-check failed" in err and "Traceback" not in err, err


def test_sigterm_drains_in_flight_refuses_new_and_exits_0(servers, oracle):
    drain = servers["drain"]
    result = {}

    def in_flight():
        result["r"] = httpx.post(f"{drain.url}/v1/generate", json={"input_ids": [[3, 4]], "max_new_tokens": 6},
                                 timeout=30)

    thread = threading.Thread(target=in_flight)
    thread.start()
    deadline = time.monotonic() + 5
    while _metric(drain, "ptuning_inflight_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(drain, "ptuning_inflight_requests") == 1  # waiting 1.5 s for companions
    drain.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    late = httpx.post(f"{drain.url}/v1/generate", json={"input_ids": [[3]], "max_new_tokens": 2}, timeout=10)
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
    assert httpx.get(f"{drain.url}/readyz", timeout=5).status_code == 503
    thread.join(30)
    assert result["r"].status_code == 200
    assert result["r"].json()["outputs"][0]["token_ids"] == _alone(oracle["causal-lm"], [3, 4], 6)
    assert drain.proc.wait(20) == 0
    assert "Traceback" not in drain.proc.stderr.read()
