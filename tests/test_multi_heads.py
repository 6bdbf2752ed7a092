"""Multi-prompt exports of seq-cls and token-cls: each adapter brings its own trained head (PEFT's
``modules_to_save``), with its own label count. One body pass over a mixed batch, every row through its adapter's
head, logits padded to the largest label count and cut back per row by the runtime.

Real parts only: adapters and oracle outputs from PEFT itself, our exports, onnxruntime through the runtime; every
comparison has a negative control (the row under another adapter's id must differ)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import MODELS, make_peft_adapter, rotated_golden_fails

# name -> (encoder, num_virtual_tokens, seed, num_labels): different encoders, prompt lengths and label counts
HEADS = {"sentiment": ("MLP", 5, 0, 2), "topic": ("LSTM", 3, 1, 3)}
AUTO = {"seq-cls": ("SEQ_CLS", "AutoModelForSequenceClassification"),
        "token-cls": ("TOKEN_CLS", "AutoModelForTokenClassification")}
TEXTS = ["a good film", "bad", "the plot was thin but the actors were fine", "ok then"]


def _build(root, task: str, model: str = "bert"):
    """{name: (peft model, adapter folder)}, the multi-prompt export (parity verified) and each single export."""
    from ptuning_onnx.export import export
    from ptuning_onnx.export.multi import export_multi

    peft_task, auto = AUTO[task]
    made = {name: make_peft_adapter(root / name, MODELS / model, peft_task, auto, encoder=enc, num_virtual_tokens=n,
                                    seed=seed, num_labels=labels)
            for name, (enc, n, seed, labels) in HEADS.items()}
    multi = export_multi(MODELS / model, {k: v[1] for k, v in made.items()}, root / "multi", progress=False)
    singles = {name: export(MODELS / model, folder, root / f"single-{name}", progress=False, skip_verify=True).path
               for name, (_, folder) in made.items()}
    return {"peft": {k: v[0] for k, v in made.items()}, "adapters": {k: v[1] for k, v in made.items()},
            "multi": multi, "singles": singles}


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory, torch_one_thread):
    return _build(tmp_path_factory.mktemp("multi-seq-cls"), "seq-cls")


@pytest.fixture(scope="module")
def token_cls(tmp_path_factory, torch_one_thread):
    return _build(tmp_path_factory.mktemp("multi-token-cls"), "token-cls")


def _peft_logits(peft_model, ids: np.ndarray, n: int, per_token: bool) -> np.ndarray:
    row = torch.from_numpy(ids[None])
    with torch.no_grad():
        logits = peft_model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0].numpy()
    return logits[n:] if per_token else logits  # PEFT keeps the virtual positions in per-token outputs


def test_seq_cls_manifest_records_each_adapters_labels_and_parity_passed(seq_cls):
    from ptuning_onnx import manifest as mf

    manifest = mf.read_manifest(seq_cls["multi"].path)
    adapters = manifest["adapters"]
    assert {k: (v["id"], v["num_labels"]) for k, v in adapters.items()} == {"sentiment": (0, 2), "topic": (1, 3)}
    assert adapters["topic"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert manifest["model"]["id2label"] is None  # labels are per adapter
    assert json.loads((seq_cls["multi"].path / "config.json").read_text())["id2label"] == {
        "0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}  # the graph's padded width
    assert [o["shape"] for o in manifest["graphs"]["model"]["outputs"]] == [["batch", 3]]
    report = manifest["parity"]
    assert report["passed"] and set(report["adapters"]) == set(HEADS)
    assert report["max_abs_diff"]["logits"] <= 1e-4
    assert report["negative_control"]["failed_as_expected"]
    assert report["negative_control"]["min_row_max_abs_diff"] > 100 * 1e-4


def test_seq_cls_rows_equal_peft_and_their_single_exports(seq_cls):
    """A mixed batch through the runtime: each row cut to its adapter's labels, equal to PEFT on the row alone and to
    the adapter's own single export; the same row under the other adapter differs (negative control)."""
    from ptuning_onnx import runtime

    multi = runtime.load(seq_cls["multi"].path)
    singles = {name: runtime.load(path) for name, path in seq_cls["singles"].items()}
    names = ["sentiment", "topic", "topic", "sentiment"]
    got = multi.classify(TEXTS, adapters=names)
    swapped = multi.classify(TEXTS, adapters=[{"sentiment": "topic", "topic": "sentiment"}[n] for n in names])
    encoded = multi.tokenizer.encode(TEXTS)
    for row, (text, name) in enumerate(zip(TEXTS, names, strict=True)):
        labels = HEADS[name][3]
        assert len(got[row]["logits"]) == labels
        ids = encoded.input_ids[row][encoded.attention_mask[row] == 1]
        peft = _peft_logits(seq_cls["peft"][name], ids, HEADS[name][1], per_token=False)
        assert np.abs(np.array(got[row]["logits"]) - peft).max() <= 1e-4
        alone = singles[name].classify(text)
        assert got[row]["label"] == alone["label"]
        assert np.abs(np.array(got[row]["logits"]) - alone["logits"]).max() <= 1e-4
        other = np.array(swapped[row]["logits"])
        shared = min(len(other), len(peft))  # the label columns both heads have (2 and 3 labels)
        assert np.abs(other[:shared] - peft[:shared]).max() > 1e-2


def test_seq_cls_golden_passes_and_sees_rotated_prompt_ids(seq_cls, tmp_path):
    from ptuning_onnx.runtime.golden import verify_golden

    report = verify_golden(seq_cls["multi"].path)
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    rotated_golden_fails(seq_cls["multi"].path, tmp_path, 2)


def test_seq_cls_gate_fails_when_an_adapter_is_another(seq_cls, tmp_path):
    """The gate can fail on values: the folder checked against a reference whose "sentiment" is another adapter of
    the same shape (2 labels, 5 virtual tokens, another seed) raises, naming the row that differs."""
    from ptuning_onnx import manifest as mf
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export.multi import load_references
    from ptuning_onnx.parity_multi import check_multi

    encoder, n, _, labels = HEADS["sentiment"]
    _, other = make_peft_adapter(tmp_path / "other", MODELS / "bert", "SEQ_CLS", AUTO["seq-cls"][1], encoder=encoder,
                                 num_virtual_tokens=n, seed=9, num_labels=labels)
    refs, _ = load_references(MODELS / "bert", {"sentiment": other, "topic": seq_cls["adapters"]["topic"]})
    manifest = mf.read_manifest(seq_cls["multi"].path)
    with pytest.raises(ParityError, match="differs from its adapter alone"):
        check_multi(seq_cls["multi"].path, refs, manifest)


def test_token_cls_rows_equal_peft_and_tag_equals_single_exports(token_cls):
    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime

    assert mf.read_manifest(token_cls["multi"].path)["parity"]["passed"]
    multi = runtime.load(token_cls["multi"].path)
    names = ["topic", "sentiment", "sentiment", "topic"]
    encoded = multi.tokenizer.encode(TEXTS)
    ids, mask = encoded.input_ids, encoded.attention_mask
    logits = multi.forward(ids, mask, adapters=names)["logits"]  # raw graph: (B, L, 3), padded columns
    wrong = multi.forward(ids, mask, adapters=[{"sentiment": "topic", "topic": "sentiment"}[n] for n in names])
    wrong = wrong["logits"]
    for row, name in enumerate(names):
        labels, real = HEADS[name][3], mask[row] == 1
        peft = _peft_logits(token_cls["peft"][name], ids[row][real], HEADS[name][1], per_token=True)
        assert np.abs(logits[row][real][:, :labels] - peft).max() <= 1e-4
        assert (logits[row][real][:, labels:] == -1e4).all()
        shared = min(h[3] for h in HEADS.values())  # not the -1e4 padding column a 2-label head gets
        assert np.abs(wrong[row][real][:, :shared] - peft[:, :shared]).max() > 1e-2
    tags = multi.tag(TEXTS, adapters=names)
    for row, name in enumerate(names):
        alone = runtime.load(token_cls["singles"][name]).tag(TEXTS[row])
        assert [(w["word"], w["label"]) for w in tags[row]] == [(w["word"], w["label"]) for w in alone]
        np.testing.assert_allclose([w["score"] for w in tags[row]], [w["score"] for w in alone], atol=1e-5)


def test_classify_and_tag_adapter_arguments(seq_cls, token_cls):
    from ptuning_onnx import runtime
    from ptuning_onnx.runtime.validation import InputError

    model = runtime.load(seq_cls["multi"].path)
    assert model.classify("fine", adapter="topic")["label"] in {"LABEL_0", "LABEL_1", "LABEL_2"}
    with pytest.raises(InputError, match=r"unknown adapter\(s\) 'nope'.*holds: sentiment, topic"):
        model.classify("fine", adapter="nope")
    with pytest.raises(InputError, match=r"holds 2 prompts \(sentiment, topic\)"):
        model.classify("fine")
    tagger = runtime.load(token_cls["multi"].path)
    with pytest.raises(InputError, match=r"unknown adapter\(s\) 'nope'"):
        tagger.tag("fine", adapter="nope")
    with pytest.raises(InputError, match="1 names for a batch of 2"):
        tagger.tag(["a", "b"], adapters=["topic"])


def test_decoder_score_heads_pool_each_rows_last_real_token(tmp_path, torch_one_thread):
    """GPT-2 seq-cls (``score`` heads, left padding): the multi-prompt graph against PEFT, each row alone."""
    from ptuning_onnx import runtime

    built = _build(tmp_path, "seq-cls", model="gpt2")
    assert built["multi"].report["passed"]
    model = runtime.load(built["multi"].path)
    names = ["topic", "sentiment", "topic"]
    got = model.classify(TEXTS[:3], adapters=names)
    encoded = model.tokenizer.encode(TEXTS[:3])
    for row, name in enumerate(names):
        ids = encoded.input_ids[row][encoded.attention_mask[row] == 1]
        peft = _peft_logits(built["peft"][name], ids, HEADS[name][1], per_token=False)
        assert np.abs(np.array(got[row]["logits"]) - peft).max() <= 1e-4


def test_dynamo_route_exports_per_row_heads(seq_cls, tmp_path):
    """The dynamo exporter traces the same graph (the heads' row selection included) and passes the same check."""
    pytest.importorskip("onnxscript")
    from ptuning_onnx.export.multi import export_multi

    result = export_multi(MODELS / "bert", seq_cls["adapters"], tmp_path / "dynamo", progress=False, exporter="dynamo")
    assert result.manifest["exporter"] == "dynamo" and result.report["passed"]
    assert result.report["max_abs_diff"]["logits"] <= 1e-4 and result.report["negative_control"]["failed_as_expected"]


def test_verify_against_pytorch_reads_the_adapters_from_the_manifest(seq_cls, tmp_path):
    """ptuning-verify --reference on a multi-prompt folder: every adapter's reference, from its recorded path."""
    from ptuning_onnx.cli.verify import main
    from ptuning_onnx.errors import ConfigError
    from ptuning_onnx.parity import verify

    report = verify(seq_cls["multi"].path, report=tmp_path / "r.json")
    assert report["passed"] and set(report["adapters"]) == set(HEADS)
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    assert main([str(seq_cls["multi"].path), "--reference"]) == 0
    with pytest.raises(ConfigError, match="holds 2 adapters"):
        verify(seq_cls["multi"].path, base_model=MODELS / "bert", adapter=seq_cls["adapters"]["topic"])
    with pytest.raises(ConfigError, match="differs from the one"):
        verify(seq_cls["multi"].path, base_model=MODELS / "gpt2")


def test_a_base_with_its_own_classifier_still_gets_each_adapters(tmp_path, torch_one_thread):
    """A base whose checkpoint already holds a classifier (nothing is fresh in it): each adapter's saved head must
    still replace it per row. Heads are found from the adapters' weights, not from the checkpoint's missing keys."""
    import shutil

    import transformers

    from ptuning_onnx import runtime
    from ptuning_onnx.export.multi import export_multi

    base = tmp_path / "bert-cls"
    torch.manual_seed(3)
    transformers.AutoModelForSequenceClassification.from_pretrained(MODELS / "bert", num_labels=2).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODELS / "bert" / name, base / name)
    made = {name: make_peft_adapter(tmp_path / name, base, "SEQ_CLS", "AutoModelForSequenceClassification",
                                    encoder=enc, num_virtual_tokens=n, seed=seed, num_labels=2)
            for name, (enc, n, seed, _) in HEADS.items()}
    result = export_multi(base, {k: v[1] for k, v in made.items()}, tmp_path / "multi", progress=False)
    model = runtime.load(result.path)
    names = ["topic", "sentiment"]
    got = model.classify(TEXTS[:2], adapters=names)
    encoded = model.tokenizer.encode(TEXTS[:2])
    for row, name in enumerate(names):
        ids = encoded.input_ids[row][encoded.attention_mask[row] == 1]
        peft = _peft_logits(made[name][0], ids, HEADS[name][1], per_token=False)
        assert np.abs(np.array(got[row]["logits"]) - peft).max() <= 1e-4
        other = _peft_logits(made["sentiment" if name == "topic" else "topic"][0], ids, HEADS[name][1], False)
        assert np.abs(np.array(got[row]["logits"]) - other).max() > 1e-2


def test_rows_are_cut_by_the_label_count_even_without_label_names(seq_cls, tmp_path):
    """An adapter entry whose id2label is empty still has its rows cut to num_labels: the -1e4 padding never
    reaches a caller, and the labels are named LABEL_i."""
    import shutil

    from ptuning_onnx import manifest as mf
    from ptuning_onnx import runtime

    folder = tmp_path / "multi"
    shutil.copytree(seq_cls["multi"].path, folder)
    path = folder / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["adapters"]["sentiment"]["id2label"] = {}
    path.write_text(json.dumps(manifest))
    got = runtime.load(folder).classify(TEXTS[:2], adapter="sentiment")
    assert [len(r["logits"]) for r in got] == [2, 2]
    assert all(r["label"] in ("LABEL_0", "LABEL_1") and min(r["logits"]) > -1e3 for r in got)
