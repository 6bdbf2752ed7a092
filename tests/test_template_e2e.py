"""Templates end to end (issue 12): training, export parity and the runtime, on the tiny models in models/.

The reference (reference_template.py) is the oracle for the export and the runtime; PEFT is the oracle for a
prefix-only template, which must train exactly what the plain prefix mode trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MODELS, ROOT, swap_in_fused_graph
from ptuning_onnx.adapter import load_adapter
from ptuning_onnx.errors import ConfigError, ParityError
from ptuning_onnx.train import TrainArgs, train

SENTIMENT = [json.loads(line) for line in (ROOT / "ptuning_onnx/data/sentiment/train.jsonl").read_text().splitlines()
             if line.strip()][:24]
CORPUS = [line.strip()[:60] for line in (ROOT / "tools/corpus.txt").read_text().splitlines() if line.strip()][:16]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _train(tmp: Path, name: str, task: str, model: str, rows: list, **kw):
    args = dict(base_model=str(MODELS / model), task=task, train_file=str(_jsonl(tmp / f"{name}.jsonl", rows)),
                output=str(tmp / name), max_steps=2, batch_size=8, learning_rate=3e-2, quiet=True, seed=7)
    args.update(kw)
    return train(TrainArgs(**args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, torch_one_thread):
    """Adapters: prefix-only template vs plain prefix (MLP), an anchored seq-cls template (LSTM), a two-field
    template without a leading slot (seq-cls), an anchored causal-lm template."""
    tmp = tmp_path_factory.mktemp("templated")
    nli = [{"premise": r["text"], "hypothesis": "I liked it", "label": r["label"]} for r in SENTIMENT]
    return tmp, {
        "plain": _train(tmp, "plain", "seq-cls", "bert", SENTIMENT, num_virtual_tokens=4),
        "prefix": _train(tmp, "prefix", "seq-cls", "bert", SENTIMENT, template="<p:4> {text}"),
        "anchor": _train(tmp, "anchor", "seq-cls", "bert", SENTIMENT, template="<p:3> {text} <p:2> It was",
                         encoder_type="lstm"),
        "nli": _train(tmp, "nli", "seq-cls", "bert", nli, template="{premise} ? <p:2> {hypothesis}"),
        "lm": _train(tmp, "lm", "causal-lm", "gpt2", [{"text": t} for t in CORPUS],
                     template="<p:2> {text} <p:3> It was"),
        "lm-suffix": _train(tmp, "lm-suffix", "causal-lm", "gpt2", [{"text": t} for t in CORPUS],
                            template="{text} <p:3> so", encoder_type="lstm"),
    }


def test_prefix_only_template_is_the_prefix_mode_and_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptuning_onnx.export.exporter import load_reference

    tmp, runs = trained
    plain, prefix = runs["plain"].adapter, runs["prefix"].adapter
    assert prefix.template == "<p:4> {text}" and load_adapter(tmp / "prefix").template == "<p:4> {text}"
    assert torch.equal(plain.prompt_embeddings, prefix.prompt_embeddings)  # same trajectory, bit for bit
    assert all(torch.equal(plain.head_weights[k], prefix.head_weights[k]) for k in plain.head_weights)
    assert [s["loss"] for s in runs["plain"].steps] == [s["loss"] for s in runs["prefix"].steps]
    # PEFT loads the templated adapter folder (template.json is ours, beside its files) and agrees with our
    # reference on the template's rendering of the same texts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(MODELS / "bert", num_labels=2)
        peft = PeftModel.from_pretrained(base, tmp / "prefix").eval()
    tok = AutoTokenizer.from_pretrained(MODELS / "bert")
    texts = [r["text"] for r in SENTIMENT[:3]]
    enc = tok(texts, padding=True, return_tensors="pt")
    ref = load_reference(MODELS / "bert", tmp / "prefix")
    from ptuning_onnx.template_data import tokenizer_specials

    rows = [ref.template.inputs({"text": t}, lambda s: tok(s, add_special_tokens=False)["input_ids"], ref.vocab_size,
                                tokenizer_specials(tok)) for t in texts]
    assert rows == [[i for i, m in zip(ids, mask, strict=True) if m] for ids, mask in
                    zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), strict=True)]
    with torch.no_grad():
        want = peft(**enc).logits
        got = ref(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")).logits
    assert (got - want).abs().max() < 1e-5


def test_training_rows_hold_placeholders_in_the_slots(trained):
    from ptuning_onnx.dataset import inspect_base, load_task_data
    from ptuning_onnx.errors import DataError
    from ptuning_onnx.template import parse

    tmp, _ = trained
    info = inspect_base(MODELS / "bert")
    t = parse("<p:3> {text} <p:2> It was")
    data = load_task_data(tmp / "anchor.jsonl", "SEQ_CLS", info, num_virtual_tokens=3, labels=["negative", "positive"],
                          template=t)
    ids = data.examples[0].input_ids
    cls, sep = info.tokenizer.cls_token_id, info.tokenizer.sep_token_id
    anchor = info.tokenizer("It was", add_special_tokens=False)["input_ids"]
    assert ids[0] == cls and ids[-1] == sep and ids[-1 - len(anchor):-1] == anchor
    assert ids[-3 - len(anchor):-1 - len(anchor)] == [info.vocab_size + 3, info.vocab_size + 4]
    bad = _jsonl(tmp / "bad.jsonl", [{"text": "fine", "label": "positive"}, {"txt": "x", "label": "negative"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: missing field 'text'"):
        load_task_data(bad, "SEQ_CLS", info, num_virtual_tokens=3, labels=["negative", "positive"], template=t)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from ptuning_onnx.export import export

    tmp, _ = trained
    out = tmp_path_factory.mktemp("templated-exports")
    return {name: export(MODELS / model, tmp / name, out / name, progress=False)
            for name, model in (("anchor", "bert"), ("nli", "bert"), ("lm", "gpt2"), ("lm-suffix", "gpt2"))}


@pytest.mark.parametrize("name", ["anchor", "nli", "lm", "lm-suffix"])
def test_export_parity_with_padded_rows_and_negative_control(exported, name):
    result = exported[name]
    report, manifest = result.report, result.manifest
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    assert report["padding_invariant"]["passed"] and max(report["max_abs_diff"].values()) < 1e-4
    entry = manifest["template"]
    assert entry["source"] == load_adapter(manifest["adapter"]["path"]).template
    assert manifest["num_virtual_tokens"] == entry["leading"] and entry["placeholder_base"] == 1000


def test_a_perturbed_inline_slot_fails_the_same_tolerance(exported):
    """The graph really reads the inline rows: perturbing ONLY them (not the prefix) must fail parity."""
    from ptuning_onnx import manifest as mf
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.parity import check_parity

    for name, model in (("anchor", "bert"), ("lm", "gpt2"), ("lm-suffix", "gpt2")):
        folder = exported[name].path
        manifest = mf.read_manifest(folder, verify=False)
        ref = load_reference(MODELS / model, manifest["adapter"]["path"])
        table = ref.prompt_rows().detach().clone()
        table[ref.n:] += 0.5 * torch.randn(table[ref.n:].shape, generator=torch.Generator().manual_seed(1))
        with pytest.raises(ParityError, match="differs from the PyTorch reference"):
            check_parity(folder, ref.with_prompt(table), manifest, atol=1e-4)


def test_runtime_applies_the_template_and_equals_the_reference(trained, exported):
    from transformers import AutoTokenizer

    from ptuning_onnx import runtime
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.template_data import tokenizer_specials

    tmp, _ = trained
    for name, model, rows in (("anchor", "bert", [{"text": "a fine film"}, "the worst kettle I have ever owned"]),
                              ("nli", "bert", [{"premise": "great", "hypothesis": "I liked it"},
                                               {"premise": "dull and long", "hypothesis": "no"}])):
        onnx = runtime.load(exported[name].path, verify="golden")
        got = np.array([r["logits"] for r in onnx.classify(rows)])
        ref = load_reference(MODELS / model, tmp / name)
        tok = AutoTokenizer.from_pretrained(MODELS / model)
        fields = [r if isinstance(r, dict) else {"text": r} for r in rows]
        ids = [ref.template.inputs(r, lambda s, tok=tok: tok(s, add_special_tokens=False)["input_ids"], ref.vocab_size,
                                   tokenizer_specials(tok)) for r in fields]
        with torch.no_grad():
            want = torch.cat([ref(torch.tensor([row])).logits for row in ids]).numpy()  # each row alone
        assert np.abs(got - want).max() < 1e-4
    tok = AutoTokenizer.from_pretrained(MODELS / "gpt2")
    for name in ("lm", "lm-suffix"):  # a left-padded batch of two prompts; each row against the reference alone
        lm = runtime.load(exported[name].path)
        ref = load_reference(MODELS / "gpt2", tmp / name)
        prompts = ["The sun rises", "Water boils at one hundred"]
        got = lm.generate([{"text": p} for p in prompts], max_new_tokens=6, eos_token_id=[])
        for prompt, text in zip(prompts, got, strict=True):
            ids = ref.template.inputs({"text": prompt}, lambda s: tok(s, add_special_tokens=False)["input_ids"], 1000)
            want = ref.greedy(torch.tensor([ids]), max_new_tokens=6)[0].tolist()
            assert text == tok.decode(want, skip_special_tokens=True)
    # Placeholders are not tokens a repetition penalty could index (ids >= vocab_size).
    assert len(lm.generate("The sun rises", max_new_tokens=3, repetition_penalty=1.3, eos_token_id=[])) > 0


def test_runtime_refuses_misplaced_placeholders(exported):
    from ptuning_onnx import runtime
    from ptuning_onnx.runtime.templating import PlaceholderError
    from ptuning_onnx.runtime.validation import InputError

    model = runtime.load(exported["anchor"].path)
    v = model.vocab_size
    good = [2, 50, v + 3, v + 4, 60, 3]
    assert model.classify(input_ids=[good])[0]["label"]
    for ids, message in (([2, 50, 60, 3], "needs placeholders \\[1003, 1004\\]"),
                         ([2, v + 1, v + 3, v + 4, 3], "placeholder id 1001 at position 1"),
                         ([2, v + 4, v + 3, 50, 3], "in order"),
                         ([2, v + 3, 50, v + 4, 3], "must be adjacent"),
                         ([2, 50, v + 9, 3], "outside")):
        with pytest.raises(PlaceholderError if "outside" not in message else InputError, match=message):
            model.classify(input_ids=[ids])
    with pytest.raises(InputError, match="row 0: the row has no field 'text'"):
        model.classify({})
    with pytest.raises(InputError, match="row 0 has field\\(s\\) 'txt' that the template"):
        model.classify({"txt": "x"})
    with pytest.raises(PlaceholderError, match="placeholder id 1004 at position 5"):  # the repeat, not the first
        model.classify(input_ids=[[2, 50, v + 3, v + 4, 60, v + 4, 3]])
    nli = runtime.load(exported["nli"].path)
    with pytest.raises(InputError, match="takes fields premise, hypothesis"):
        nli.classify("a plain string")
    with pytest.raises(InputError, match="field 'premise' is empty"):
        nli.classify({"premise": " ", "hypothesis": "it rains"})


def test_a_malformed_template_entry_is_a_manifest_error(exported, tmp_path):
    import json
    import shutil

    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime
    from ptuning_onnx.errors import ManifestError

    for change, message in (({"source": None}, "no template source"), ({"source": "<p:²> {text}"}, "positive"),
                            ({"placeholder_base": 7}, "not at the vocabulary's end")):
        folder = tmp_path / str(len(message))
        shutil.copytree(exported["anchor"].path, folder)
        manifest = json.loads((folder / mf.MANIFEST_NAME).read_text())
        manifest["template"].update(change)
        (folder / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=message):
            runtime.load(folder)


def test_service_takes_rows_of_fields(exported):
    """The REAL server on a two-field (NLI) template: rows of fields in, the runtime's answers out; /v1/model is
    the same folder."""
    pytest.importorskip("fastapi")
    import httpx

    from ptuning_onnx import runtime
    from test_serve import Server

    folder = exported["nli"].path
    rows = [{"premise": "the cat sat", "hypothesis": "a cat"}, {"premise": "rain", "hypothesis": "sun"}]
    want = runtime.load(folder, provider="cpu", threads=1).classify(rows)
    server = Server(folder, "--max-wait-ms", "20").wait()
    try:
        got = httpx.post(f"{server.url}/v1/classify", json={"texts": rows}, timeout=60)
        assert got.status_code == 200, got.text
        assert [r["label"] for r in got.json()["results"]] == [r["label"] for r in want]
        np.testing.assert_allclose([r["logits"] for r in got.json()["results"]], [r["logits"] for r in want],
                                   atol=1e-5)
        one = httpx.post(f"{server.url}/v1/classify", json={"texts": rows[0]}, timeout=60).json()["results"]
        assert len(one) == 1 and one[0]["label"] == want[0]["label"]
        bad = httpx.post(f"{server.url}/v1/classify", json={"texts": [{"premise": "x"}]}, timeout=60)
        assert bad.status_code == 400 and "hypothesis" in bad.json()["error"]["message"]
    finally:
        server.stop()


def test_cli_template_errors_are_one_line(tmp_path, capsys):
    from ptuning_onnx.cli.train import main

    data = _jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    base = ["--train-file", str(data), "--output", str(tmp_path / "o"), "--quiet"]
    for argv, message in (
            (["--base-model", str(MODELS / "bert"), "--task", "seq-cls", "--template", "<p:0> {text}"],
             "positive integer"),
            (["--base-model", str(MODELS / "gpt2"), "--task", "causal-lm", "--template", "<p:2> {text"],
             "unbalanced '{'"),
            (["--base-model", str(MODELS / "bert"), "--task", "token-cls", "--template", "<p:2> {text}"],
             "trains seq-cls and causal-lm"),
            (["--base-model", str(MODELS / "bert"), "--task", "seq-cls", "--template", "<p:2> {text} <p:1> so",
              "--num-virtual-tokens", "20"], "--num-virtual-tokens 20 contradicts --template, whose slots hold 3"),
            (["--base-model", str(MODELS / "bert"), "--task", "seq-cls", "--template", "<p:2> {text}",
              "--num-virtual-tokens=5"], "contradicts --template")):
        assert main(argv + base) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_trains_with_a_template_in_a_subprocess(tmp_path):
    data = _jsonl(tmp_path / "t.jsonl", SENTIMENT[:8])
    out = subprocess.run([sys.executable, "-m", "ptuning_onnx.cli.train", "--base-model", str(MODELS / "bert"),
                          "--task", "seq-cls", "--train-file", str(data), "--output", str(tmp_path / "o"),
                          "--template", "<p:2> {text} <p:2> It was", "--max-steps", "1", "--quiet"],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                              "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "o" / "template.json").read_text()) == {"template": "<p:2> {text} <p:2> It was"}
    with pytest.raises(ConfigError, match="has 4 virtual tokens"):
        from ptuning_onnx.reference_template import TemplatePTuningModel

        TemplatePTuningModel(load_adapter_base(), torch.zeros(3, 64), "SEQ_CLS", "<p:2> {text} <p:2> It was")


def load_adapter_base():
    from ptuning_onnx.reference import load_base

    return load_base(MODELS / "bert", "SEQ_CLS", labels=["a", "b"])


def test_feature_extraction_template_from_a_peft_adapter(tmp_path):
    """A PEFT-written adapter plus our template.json: the export maps its placeholders, `embed` takes raw rows."""
    from transformers import AutoTokenizer

    from conftest import make_peft_adapter
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.template_data import tokenizer_specials

    make_peft_adapter(tmp_path / "fe", MODELS / "bert", "FEATURE_EXTRACTION", "AutoModel", num_virtual_tokens=5)
    (tmp_path / "fe" / "template.json").write_text(json.dumps({"template": "<p:2> {text} <p:3> so"}))
    result = export(MODELS / "bert", tmp_path / "fe", tmp_path / "onnx", progress=False)
    assert result.report["passed"] and result.manifest["template"]["inline_slots"] == [[2, 3]]
    model = runtime.load(result.path)
    got = model.embed(["a fine film", "dull"])
    ref = load_reference(MODELS / "bert", tmp_path / "fe")
    tok = AutoTokenizer.from_pretrained(MODELS / "bert")
    for row, text in enumerate(["a fine film", "dull"]):
        ids = ref.template.inputs({"text": text}, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                                  ref.vocab_size, tokenizer_specials(tok))
        with torch.no_grad():
            hidden = ref(torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()
        assert np.abs(got[row] - hidden).max() < 1e-4
    (tmp_path / "fe" / "template.json").write_text(json.dumps({"template": "<p:2> {text}"}))
    from ptuning_onnx.errors import AdapterError

    with pytest.raises(AdapterError, match="template has 2 virtual tokens but the adapter config says"):
        load_adapter(tmp_path / "fe")


def test_resume_keeps_the_template(tmp_path, torch_one_thread):
    rows = SENTIMENT[:8]
    _train(tmp_path, "r", "seq-cls", "bert", rows, template="<p:2> {text} <p:2> It was", max_steps=1)
    with pytest.raises(ConfigError, match="cannot resume: --template was '<p:2> {text} <p:2> It was'"):
        _train(tmp_path, "r", "seq-cls", "bert", rows, template="<p:4> {text}", max_steps=2, resume=True)
    done = _train(tmp_path, "r", "seq-cls", "bert", rows, template="<p:2> {text} <p:2> It was", max_steps=2,
                  resume=True)
    assert done.step == 2 and load_adapter(tmp_path / "r").template == "<p:2> {text} <p:2> It was"


@pytest.mark.parametrize("name,model,quantize", [("anchor", "bert", "int8"), ("lm", "gpt2", "int8"),
                                                 ("lm", "gpt2", "int4")])
def test_quantized_templated_exports_pass_their_gate_with_the_slots_in_the_cases(trained, tmp_path, name, model,
                                                                                 quantize):
    """--quantize with a template: the fp32 graph first passes the exact gate with the slots in its cases (where a
    wrong inline row is caught, test above), the quantized gate's cases and golden.npz hold every inline slot's
    placeholders, golden.npz checks out in the runtime, and on GPT-2, where the inline rows move the logits by more
    than quantization does, perturbing ONLY them fails the quantized gate too. (On the tiny BERT their effect on
    the pooled logits is ~0.1% of the prompt's, below what a relative gate can see: the exact gate holds them.)"""
    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.parity_quantized import check_quantized

    tmp, _ = trained
    result = export(MODELS / model, tmp / name, tmp_path / "out", quantize=quantize, progress=False)
    report = result.report
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    assert report["fp32_exact"]["passed"]  # the fp32 graph, before quantizing, held to 1e-4 with the slots
    assert runtime.verify_golden(result.path, provider="cpu")["passed"]
    manifest = mf.read_manifest(result.path, verify=False)
    vocab, slots = manifest["model"]["vocab_size"], manifest["template"]["inline_slots"]
    placeholders = {vocab + first + k for first, count in slots for k in range(count)}
    golden = np.load(result.path / "golden.npz")
    for key in [k for k in golden.files if k.endswith("input_ids")]:
        ids, mask = golden[key], golden[key.replace("input_ids", "attention_mask")]
        for row, real in zip(ids, mask, strict=True):
            assert set(row[real == 1][row[real == 1] >= vocab].tolist()) == placeholders, key
    if model == "bert":
        return
    ref = load_reference(MODELS / model, manifest["adapter"]["path"])
    table = ref.prompt_rows().detach().clone()
    table[ref.n:] += 2.0 * torch.randn(table[ref.n:].shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ParityError, match="differs from the PyTorch reference"):
        check_quantized(result.path, ref.with_prompt(table), manifest)


@pytest.mark.parametrize("template", ["<p:2> {text} <p:3> It was", "{text} <p:3> so"])
def test_templated_llama_gets_the_fused_graph_with_exact_parity(tmp_path, torch_one_thread, template):
    """--optimize on a templated Llama (with a leading slot, and without one: no prompt in the cache): the builder
    maps placeholder ids to their prompt rows in the graph (as the traced template graph does). The fused graph
    passes the exact gate with the slots in its cases, perturbing only the inline rows fails it, and raw fields
    generate what the reference generates (shared KV buffers)."""
    from transformers import AutoTokenizer

    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export
    from ptuning_onnx.export.exporter import load_reference
    from ptuning_onnx.parity import check_parity
    from ptuning_onnx.template_data import tokenizer_specials

    adapter = _train(tmp_path, "llama-t", "causal-lm", "llama", [{"text": t} for t in CORPUS], template=template)
    result = export(MODELS / "llama", tmp_path / "llama-t", tmp_path / "out", optimize=True, progress=False)
    assert adapter is not None and result.report["passed"]
    assert result.manifest["optimization"]["recipe"] == "ptuning-onnx llama builder"
    ref = load_reference(MODELS / "llama", tmp_path / "llama-t")
    folder = swap_in_fused_graph(result.path, tmp_path / "fused", ref)  # whatever the timing kept
    manifest = mf.read_manifest(folder)
    report = check_parity(folder, ref, manifest, atol=1e-4)
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    table = ref.prompt_rows().detach().clone()
    table[ref.n:] += 0.5 * torch.randn(table[ref.n:].shape, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ParityError, match="differs from the PyTorch reference"):
        check_parity(folder, ref.with_prompt(table), manifest, atol=1e-4)
    model = runtime.load(folder, verify=False)
    tok = AutoTokenizer.from_pretrained(MODELS / "llama")
    prompts = ["The sun rises", "Water boils at one hundred degrees"]
    got = model.generate([{"text": p} for p in prompts], max_new_tokens=5, eos_token_id=[])
    for prompt, text in zip(prompts, got, strict=True):
        ids = ref.template.inputs({"text": prompt}, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                                  ref.vocab_size, tokenizer_specials(tok))  # Llama's tokenizer adds BOS
        want = ref.greedy(torch.tensor([ids]), max_new_tokens=5)[0].tolist()
        assert text == tok.decode(want, skip_special_tokens=True)


def test_quantized_gate_and_golden_agree_on_the_decoding_case_with_long_slots(tmp_path, torch_one_thread):
    """32 inline tokens make every parity case equally long: the quantized gate must decode from the exact gate's
    case, or golden.npz loses its decoding control and the runtime's check refuses a fresh export."""
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export

    _train(tmp_path, "long", "causal-lm", "gpt2", [{"text": t} for t in CORPUS], template="<p:2> {text} <p:32> so")
    result = export(MODELS / "gpt2", tmp_path / "long", tmp_path / "out", quantize="int8", progress=False)
    assert result.report["passed"]
    golden = np.load(result.path / "golden.npz")
    assert "greedy.control.logits" in golden.files
    assert runtime.verify_golden(result.path, provider="cpu")["passed"]


@pytest.mark.parametrize("options", [{"quantize": "int8"}, {"dtype": "fp16"}])
def test_templated_llama_with_optimize_and_a_precision_pass_verifies(tmp_path, torch_one_thread, options):
    """--optimize with --quantize int8 or --dtype fp16 on a templated Llama: the export's gates pass and the
    folder's golden.npz (cases with the slots) checks out in the runtime."""
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export

    _train(tmp_path, "t", "causal-lm", "llama", [{"text": t} for t in CORPUS], template="<p:2> {text} <p:3> It was")
    result = export(MODELS / "llama", tmp_path / "t", tmp_path / "out", optimize=True, progress=False, **options)
    assert result.report["passed"] and result.manifest["optimization"]["recipe"] == "ptuning-onnx llama builder"
    assert runtime.verify_golden(result.path, provider="cpu")["passed"]
