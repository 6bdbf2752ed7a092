"""The fused Llama-family graph (export/build_llama.py): what ``--optimize`` writes for a Llama causal LM.

Real parts: the tiny Llama of models/, PEFT-written adapters, onnxruntime sessions; PEFT is the oracle for the tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import MODELS, make_peft_adapter, swap_in_fused_graph
from ptuning_onnx.adapter import load_adapter
from ptuning_onnx.errors import ParityError
from ptuning_onnx.export import export
from ptuning_onnx.export import build_llama
from ptuning_onnx.export.exporter import load_reference
from ptuning_onnx.parity import check_parity


@pytest.fixture(scope="module")
def built(peft_adapters, tmp_path_factory):
    """An optimized export of the tiny Llama (GQA: 4 heads over 2 KV heads)."""
    root = tmp_path_factory.mktemp("built")
    adapter = peft_adapters["causal-lm-llama"]
    fused = export(MODELS / "llama", adapter, root / "fused", optimize=True, progress=False)
    return fused, adapter, root


def test_optimize_writes_the_fused_graph_and_keeps_exact_parity(built):
    fused, _, _ = built
    decision = fused.manifest["optimization"]
    assert decision["recipe"] == "ptuning-onnx llama builder"
    layers = json.loads((MODELS / "llama" / "config.json").read_text())["num_hidden_layers"]
    assert decision["fused_ops"]["model"]["GroupQueryAttention"] == layers
    assert decision["nodes"]["model"]["fused"] < decision["nodes"]["model"]["unfused"] / 3
    report = fused.report
    assert report["passed"] and report["atol"] == 1e-4 and report["negative_control"]["failed_as_expected"]
    if decision["kept"] == "fused":
        ops = {n.op_type for n in onnx.load(str(fused.path / "model.onnx")).graph.node}
        assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} <= ops
        assert decision["min_onnxruntime"] == build_llama.MIN_ONNXRUNTIME
    kept_fused = decision["kept"] == "fused"
    assert fused.manifest["model"]["past_present_share_buffer"] is kept_fused
    assert fused.manifest["model"]["cache_holds_prompt"] is kept_fused


def test_the_fused_graph_passes_the_exact_gate_whatever_the_timing_kept(built, tmp_path):
    """The export's report belongs to whichever graph was faster; this puts the fused graph in the folder and runs
    the exact gate on it (unseen shapes, padded rows, greedy steps, the cache), negative control included."""
    import shutil

    fused, adapter, _ = built
    folder = tmp_path / "folder"
    shutil.copytree(fused.path, folder)
    ref = load_reference(MODELS / "llama", load_adapter(adapter), None)
    build_llama.build(ref, folder / "model.onnx")
    manifest = json.loads((folder / "ptuning_onnx.json").read_text())
    report = check_parity(folder, ref, manifest, atol=1e-4)
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    assert report["padding_invariant"]["passed"]  # left padding lives in the attention bias
    assert max(report["max_abs_diff"].values()) < 1e-5


def test_a_runtime_too_old_for_the_fused_graph_is_named(built, tmp_path):
    import shutil

    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime
    from ptuning_onnx.errors import ConfigError

    fused, _, _ = built
    folder = tmp_path / "folder"
    shutil.copytree(fused.path, folder)
    manifest = json.loads((folder / mf.MANIFEST_NAME).read_text())
    manifest["optimization"]["min_onnxruntime"] = "99.0"
    (folder / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"needs onnxruntime >= 99.0; this is"):
        runtime.load(folder)


def _fused_model(built, tmp_path, share_buffer: bool = True):
    """A runtime model of the fused graph, whatever the export's timing kept, with the manifest's cache entries
    as the builder's graph has them (``share_buffer`` False: the runtime's copying loop)."""
    from ptuning_onnx import runtime

    return runtime.load(_fused_folder(built, tmp_path, share_buffer), verify=False)


def _fused_folder(built, tmp_path, share_buffer: bool = True):
    fused, adapter, _ = built
    return swap_in_fused_graph(fused.path, tmp_path / f"folder-{share_buffer}",
                               load_reference(MODELS / "llama", load_adapter(adapter), None), share_buffer=share_buffer)


def _padded_rows(seed: int, lengths) -> tuple:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(4, 1000, size=n).tolist() for n in lengths]
    width = max(map(len, rows))
    ids = np.array([[3] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return rows, ids, mask


@pytest.mark.parametrize("share_buffer", [True, False])
def test_fused_graph_generates_what_peft_generates(built, tmp_path, share_buffer, monkeypatch):
    """Greedy tokens through the runtime (left-padded batch of 3, one row alone) equal PEFT's own generate, with
    the cache in one shared buffer per tensor (written in place) and with the copying loop."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ptuning_onnx.runtime import generation

    _, adapter, _ = built
    model = _fused_model(built, tmp_path, share_buffer)
    made = []

    class Counted(generation.SharedKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(next(iter(self.buffers.values())).shape[2])  # capacity

    monkeypatch.setattr(generation, "SharedKVCache", Counted)
    rows, ids, mask = _padded_rows(3, (7, 3, 12))
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    # One buffer set per call, sized for the prompt, the 12 padded positions and the 7 tokens after the prefill.
    assert made == ([model.num_virtual_tokens + 12 + 7] if share_buffer else [])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODELS / "llama"), adapter).eval()
    for row, got in zip(rows, ours, strict=True):
        with torch.no_grad():
            row_ids = torch.tensor([row])
            out = peft.generate(input_ids=row_ids, attention_mask=torch.ones_like(row_ids), max_new_tokens=8,
                                do_sample=False, pad_token_id=3, eos_token_id=None)
        assert list(got) == out[0, len(row):].tolist()


def test_shared_buffer_samples_and_streams_what_the_copying_loop_does(built, tmp_path):
    """Seeded sampling with a repetition penalty, streaming, and an early stop at EOS: the in-place cache gives
    the copying loop's tokens exactly."""
    shared, copying = _fused_model(built, tmp_path, True), _fused_model(built, tmp_path, False)
    _, ids, mask = _padded_rows(5, (9, 2, 5, 14))
    params = dict(max_new_tokens=24, do_sample=True, seed=11, temperature=0.9, top_k=40, top_p=0.95,
                  repetition_penalty=1.3, eos_token_id=[])
    a = shared.generate(input_ids=ids, attention_mask=mask, **params)
    b = copying.generate(input_ids=ids, attention_mask=mask, **params)
    assert np.array_equal(a, b) and len(set(np.asarray(a).ravel().tolist())) > 10  # sampled, not constant
    one = [np.asarray(m.generate(input_ids=ids[:1], attention_mask=mask[:1], **params))[0].tolist()
           for m in (shared, copying)]
    assert one[0] == one[1]
    eos = one[0][5]
    stop = one[0].index(eos)  # where the row stops with that EOS
    stops = [m.generate(input_ids=ids[:1], attention_mask=mask[:1], **dict(params, eos_token_id=[eos]))
             for m in (shared, copying)]
    assert np.array_equal(*stops) and np.asarray(stops[0])[0].tolist()[:stop + 1] == one[0][:stop + 1]
    assert set(np.asarray(stops[0])[0, stop + 1:].tolist()) <= {shared.pad_token_id}
    streamed = [list(m.stream(input_ids=ids[:1], attention_mask=mask[:1], **params)) for m in (shared, copying)]
    assert streamed[0] == streamed[1] == one[0]


def test_shared_cache_steps_match_returned_presents_and_own_their_buffers(built, tmp_path):
    """SharedKVCache's contract, step by step against the copying path (session.run with the presents passed back):
    the same logits and cache at every step; the logits it returned, and the arrays a caller passed, may change
    afterwards without changing either side; a step of two tokens is refused."""
    from ptuning_onnx.runtime.generation import empty_past, positions
    from ptuning_onnx.runtime.session import SharedKVCache

    session = _fused_model(built, tmp_path).sessions["model"]
    names = [o.name for o in session.get_outputs()]
    _, ids, mask = _padded_rows(3, (6, 2))
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), **empty_past(session, 2)}
    out = dict(zip(names, session.run(names, feed), strict=True))
    past = {n: out[n.replace("past_key_values", "present", 1)] for n in feed if n.startswith("past_key_values")}
    cache = SharedKVCache(session, dict(past), steps=4)
    kept, given, bound = [], [], []
    for _ in range(4):
        token = out["logits"][:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        step = {"input_ids": token, "attention_mask": mask, "position_ids": mask.sum(-1, keepdims=True) - 1}
        out = dict(zip(names, session.run(names, {**step, **past}), strict=True))
        past = {n: out[n.replace("past_key_values", "present", 1)] for n in past}
        shared = cache.run(step)
        kept.append((shared, shared.copy()))
        given.append({k: (v, v.copy()) for k, v in step.items()})
        bound.append(cache._inputs["input_ids"][1])
        np.testing.assert_allclose(shared, out["logits"], atol=1e-5)
        for name, value in cache.past().items():
            np.testing.assert_array_equal(value, past[name])
    assert all(np.array_equal(a, b) for a, b in kept)  # no later step wrote into an earlier step's logits
    # The caller's arrays are never bound: later steps did not write into them.
    assert all(np.array_equal(a, b) for step in given for a, b in step.values())
    assert all(value is bound[0] for value in bound)  # the ids stayed bound: each step copied into them
    with pytest.raises(ValueError, match="one token per row"):
        cache.run({"input_ids": np.zeros((2, 2), np.int64), "attention_mask": mask, "position_ids": mask[:, -2:]})


def test_parity_fails_a_fused_graph_built_from_another_prompt(built, tmp_path):
    """Negative control for the builder itself: the graph of a different adapter's prompt, dropped into this
    folder, fails the same exact gate."""
    import shutil

    fused, adapter, root = built
    other = make_peft_adapter(root / "other", MODELS / "llama", "CAUSAL_LM", "AutoModelForCausalLM", seed=7)[1]
    folder = tmp_path / "folder"
    shutil.copytree(fused.path, folder)
    build_llama.build(load_reference(MODELS / "llama", load_adapter(other), None), folder / "model.onnx")
    ref = load_reference(MODELS / "llama", load_adapter(adapter), None)
    manifest = json.loads((folder / "ptuning_onnx.json").read_text())
    with pytest.raises(ParityError, match="differs from the PyTorch reference"):
        check_parity(folder, ref, manifest, atol=1e-4)


@pytest.mark.parametrize("change,reason", [
    ({"model_type": "gpt2"}, "model type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"model_type": "mistral", "sliding_window": 64}, "sliding attention window"),
])
def test_unsupported_configs_are_named(change, reason):
    from transformers import LlamaConfig

    config = LlamaConfig(**json.loads((MODELS / "llama" / "config.json").read_text()))
    assert build_llama.unsupported(config) is None
    for key, value in change.items():
        setattr(config, key, value)
    assert reason in build_llama.unsupported(config)


def test_optimize_on_gpt2_says_why_no_graph_was_built(peft_adapters, tmp_path):
    result = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", optimize=True, progress=False)
    decision = result.manifest["optimization"]
    assert decision["recipe"] == "gpt2" and "model type 'gpt2'" in decision["builder"]


def _staggered(server, requests: list) -> list:
    """Each generate request through the REAL server, 20 ms apart, so that rows join a batch already decoding;
    the token ids of each answer, in order."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import _post

    def send(item):
        time.sleep(item[0] * 0.02)
        return _post(server, "/v1/generate", item[1], headers={}).json()["outputs"][0]["token_ids"]

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, enumerate(requests)))


@pytest.mark.parametrize("share_buffer", [True, False])
def test_service_batches_a_fused_folder_like_rows_alone(built, tmp_path, share_buffer):
    """The fused graph's cache holds the prompt's positions first; the service's continuous batcher trims and pads
    caches when rows join and leave, and decodes in shared buffers (rebuilt at each join and leave, sized for the
    longest row left) or with the copying loop. Staggered requests of different lengths through the REAL server
    equal each row alone through the runtime's copying loop, and the batch-size histogram shows that they ran
    together."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")

    from ptuning_onnx import runtime
    from test_serve import Server, _alone, _metric

    folder = _fused_folder(built, tmp_path, share_buffer)
    oracle = runtime.load(_fused_folder(built, tmp_path / "oracle", False), provider="cpu", threads=1)
    server = Server(folder, "--max-batch-size", "8", "--max-wait-ms", "30").wait()
    try:
        rng = np.random.default_rng(5)
        requests = [{"input_ids": [rng.integers(4, 1000, size=int(rng.integers(1, 20))).tolist()],
                     "max_new_tokens": int(rng.integers(3, 16)), "eos_token_id": []} for _ in range(6)]
        alone = [_alone(oracle, r["input_ids"][0], r["max_new_tokens"], eos_token_id=[]) for r in requests]
        before = _metric(server, "ptuning_batch_size_count", kind="generate") - _metric(
            server, "ptuning_batch_size_bucket", kind="generate", le="1.0")

        together = _staggered(server, requests)
        assert together == alone
        after = _metric(server, "ptuning_batch_size_count", kind="generate") - _metric(
            server, "ptuning_batch_size_bucket", kind="generate", le="1.0")
        assert after > before
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


def test_fused_folder_says_its_cache_holds_the_prompt_and_has_no_genai_config(built, exports):
    """onnxruntime-genai sizes each present as its own token count (it fails on a cache that also holds the prompt),
    so only the traced folder carries genai_config.json; the manifest says which convention the cache follows."""
    fused, _, _ = built
    traced = exports["causal-lm-llama"]
    from ptuning_onnx import manifest as mf

    assert fused.manifest["model"]["cache_holds_prompt"] is (fused.manifest["optimization"]["kept"] == "fused")
    assert (fused.path / "genai_config.json").exists() is not fused.manifest["model"]["cache_holds_prompt"]
    assert mf.read_manifest(traced)["model"]["cache_holds_prompt"] is False
    assert (traced / "genai_config.json").exists()
    if fused.manifest["model"]["cache_holds_prompt"]:
        from ptuning_onnx import runtime

        model = runtime.load(fused.path)
        n = fused.manifest["num_virtual_tokens"]
        session = model.sessions["model"]
        import numpy as np

        from ptuning_onnx.runtime.generation import empty_past

        out = session.run(None, {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
                                 "position_ids": np.array([[0, 1, 2]]), **empty_past(session, 1)})
        assert out[1].shape[2] == n + 3  # present.0.key: the prompt's positions, then the user's


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families_build_and_keep_exact_parity(family, tmp_path):
    """The builder's other families, tiny and seeded: Qwen2 (q/k/v biases) and Mistral (no sliding window here)."""
    import shutil

    import torch
    import transformers

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, pad_token_id=3,
                 bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        config, model_cls = transformers.Qwen2Config(**sizes, use_sliding_window=False), transformers.Qwen2ForCausalLM
    else:
        config, model_cls = transformers.MistralConfig(**sizes, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(0)
    base = tmp_path / "base"
    model_cls(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (MODELS / "llama" / name).exists():
            shutil.copy(MODELS / "llama" / name, base / name)
    adapter = make_peft_adapter(tmp_path / "adapter", base, "CAUSAL_LM", "AutoModelForCausalLM")[1]
    ref = load_reference(base, load_adapter(adapter), None)
    assert build_llama.unsupported(ref.base.config) is None
    folder = tmp_path / "out"
    export(base, adapter, folder, progress=False, skip_verify=True)
    build_llama.build(ref, folder / "model.onnx")
    report = check_parity(folder, ref, json.loads((folder / "ptuning_onnx.json").read_text()), atol=1e-4)
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    if family == "qwen2":
        assert any(n.op_type == "Add" for n in onnx.load(str(folder / "model.onnx")).graph.node)  # the q|k|v bias


def test_a_large_graph_keeps_the_fused_graph_untimed(peft_adapters, tmp_path, monkeypatch):
    """Above UNTIMED_BYTES of weights the fused graph is kept without the timing (two sessions of a 1B model beside
    the reference took the export to 4.2x its weights); the manifest says so, and parity runs on it."""
    from ptuning_onnx.export import fusion

    monkeypatch.setattr(fusion, "UNTIMED_BYTES", 0)
    result = export(MODELS / "llama", peft_adapters["causal-lm-llama"], tmp_path / "out", optimize=True,
                    progress=False)
    decision = result.manifest["optimization"]
    assert decision["kept"] == "fused" and decision["ms"] is None and decision["reason"].startswith("not timed")
    assert result.report["passed"] and result.manifest["model"]["cache_holds_prompt"]
    assert "GroupQueryAttention" in {n.op_type for n in onnx.load(str(result.path / "model.onnx")).graph.node}
    assert sorted(p.name for p in result.path.iterdir()) == sorted([*result.manifest["files"], "ptuning_onnx.json"])


@pytest.fixture(scope="module")
def multi_built(peft_adapters, tmp_path_factory):
    """A multi-prompt export of the tiny Llama with --optimize: two PEFT adapters of 5 and 3 virtual tokens (the
    shorter one leaves masked slots), plus a copy of the folder holding the fused graph, whatever the timing kept."""

    from ptuning_onnx.export.multi import export_multi, load_references

    root = tmp_path_factory.mktemp("multi-built")
    short = make_peft_adapter(root / "short", MODELS / "llama", "CAUSAL_LM", "AutoModelForCausalLM", seed=3,
                              num_virtual_tokens=3)[1]
    adapters = {"long": peft_adapters["causal-lm-llama"], "short": short}
    result = export_multi(MODELS / "llama", adapters, root / "exported", optimize=True, progress=False)
    refs, _ = load_references(MODELS / "llama", adapters)
    folder = swap_in_fused_graph(result.path, root / "fused", [refs["long"], refs["short"]])
    return result, folder, refs, adapters


def test_multi_prompt_export_builds_the_fused_graph(multi_built):
    result, _, _, _ = multi_built
    decision = result.manifest["optimization"]
    assert decision["recipe"] == "ptuning-onnx llama builder" and result.report["passed"]
    kept_fused = decision["kept"] == "fused"
    assert result.manifest["model"]["past_present_share_buffer"] is kept_fused
    assert (result.path / "genai_config.json").is_file() is not kept_fused  # genai sizes presents without slots


def test_fused_multi_prompt_graph_passes_the_exact_gate(multi_built):
    """The multi-prompt exact gate on the fused graph: every adapter's rows, padded batches, greedy steps through
    the cache, and rows given the other adapter's id must miss (the negative control)."""
    from ptuning_onnx.parity_multi import check_multi

    _, folder, refs, _ = multi_built
    manifest = json.loads((folder / "ptuning_onnx.json").read_text())
    report = check_multi(folder, {"long": refs["long"], "short": refs["short"]}, manifest, atol=1e-4)
    assert report["passed"] and report["negative_control"]["failed_as_expected"]


@pytest.mark.parametrize("share_buffer", [True, False])
def test_fused_multi_prompt_graph_generates_what_each_adapter_generates(multi_built, share_buffer):
    """A left-padded batch mixing both adapters, through the runtime (shared buffers and the copying loop), gives
    each row PEFT's own greedy tokens for its adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ptuning_onnx import runtime

    _, folder, _, adapters = multi_built
    model = runtime.load(folder, verify=False)
    model.manifest["model"]["past_present_share_buffer"] = share_buffer
    rows, ids, mask = _padded_rows(8, (6, 11, 2, 9))
    names = ["short", "long", "long", "short"]
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], adapters=names)
    for row, name, got in zip(rows, names, ours, strict=True):
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODELS / "llama"), adapters[name]).eval()
        with torch.no_grad():
            row_ids = torch.tensor([row])
            out = peft.generate(input_ids=row_ids, attention_mask=torch.ones_like(row_ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=3, eos_token_id=None)
        assert list(got) == out[0, len(row):].tolist(), name


def test_service_batches_a_fused_multi_prompt_folder_like_rows_alone(multi_built):
    """Staggered requests of both adapters through the REAL server's continuous batcher (shared buffers, the N
    prompt slots kept when rows join and leave) equal each row alone through the runtime."""
    pytest.importorskip("fastapi")

    from ptuning_onnx import runtime
    from test_serve import Server, _alone

    _, folder, _, _ = multi_built
    oracle = runtime.load(folder, provider="cpu", threads=1)
    server = Server(folder, "--max-batch-size", "8", "--max-wait-ms", "30").wait()
    try:
        rng = np.random.default_rng(9)
        requests = [{"input_ids": [rng.integers(4, 1000, size=int(rng.integers(1, 20))).tolist()],
                     "max_new_tokens": int(rng.integers(3, 14)), "eos_token_id": [], "adapter": name}
                    for name in ("long", "short", "short", "long", "short", "long")]
        alone = [_alone(oracle, r["input_ids"][0], r["max_new_tokens"], eos_token_id=[], adapter=r["adapter"])
                 for r in requests]
        other = [_alone(oracle, r["input_ids"][0], r["max_new_tokens"], eos_token_id=[],
                        adapter="short" if r["adapter"] == "long" else "long") for r in requests]
        assert alone != other  # the adapter matters for these rows (negative control)

        together = _staggered(server, requests)
        assert together == alone
    finally:
        server.stop()


def test_the_fused_graph_loads_at_the_lowest_opset(built, tmp_path):
    """The builder writes only ops valid at the export's opset (Split by a sizes input, not opset 18's
    num_outputs): at opset 14 onnxruntime loads the graph and the exact gate passes."""
    from ptuning_onnx import manifest as mf
    from ptuning_onnx.parity import check_parity

    fused, adapter, _ = built
    ref = load_reference(MODELS / "llama", load_adapter(adapter), None)
    folder = swap_in_fused_graph(fused.path, tmp_path / "folder", ref, opset=14)
    assert onnx.load(str(folder / "model.onnx")).opset_import[0].version == 14
    assert check_parity(folder, ref, mf.read_manifest(folder), atol=1e-4)["passed"]
