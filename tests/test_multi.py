"""Multi-prompt exports: several PEFT adapters of one base model in ONE graph, picked per row by ``prompt_ids``.

Real parts only: adapters written by PEFT (different encoders and prompt lengths), our exports, onnxruntime sessions
through the runtime. Each row of a mixed, padded batch must give what its adapter's own single export gives; rows
given another adapter's id must not (the negative control).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MODELS, make_gpt2_adapters, make_peft_adapter, rotated_golden_fails

# name -> (encoder, num_virtual_tokens, seed): different encoders and prompt lengths, so the tables are padded
ADAPTERS = {"news": ("MLP", 5, 0), "chat": ("LSTM", 3, 1), "code": ("MLP", 8, 2)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """GPT-2: three adapters, their multi-prompt export (parity verified) and each one's single export."""
    from ptuning_onnx.export import export
    from ptuning_onnx.export.multi import export_multi

    root = tmp_path_factory.mktemp("multi")
    adapters = make_gpt2_adapters(root, ADAPTERS)
    multi = export_multi(MODELS / "gpt2", adapters, root / "multi", progress=False)
    singles = {name: export(MODELS / "gpt2", path, root / f"single-{name}", progress=False, skip_verify=True).path
               for name, path in adapters.items()}
    return {"root": root, "adapters": adapters, "multi": multi, "singles": singles}


def _mixed(rows=6, length=7, seed=0):
    """Left-padded ids/mask: rows 3.. keep 4, 1 and 6 real tokens; adapter names in turn."""
    ids = np.random.default_rng(seed).integers(5, 1000, (rows, length))
    mask = np.ones_like(ids)
    for row, real in zip(range(3, rows), (4, 1, 6), strict=False):
        ids[row, :length - real], mask[row, :length - real] = 1, 0
    names = [list(ADAPTERS)[r % 3] for r in range(rows)]
    return ids, mask, names


def test_manifest_maps_names_to_ids_and_parity_passed(built):
    from ptuning_onnx import manifest as mf

    result = built["multi"]
    manifest = mf.read_manifest(result.path)
    assert {k: v["id"] for k, v in manifest["adapters"].items()} == {"news": 0, "chat": 1, "code": 2}
    assert {k: v["num_virtual_tokens"] for k, v in manifest["adapters"].items()} == {"news": 5, "chat": 3, "code": 8}
    assert manifest["num_virtual_tokens"] == 8 and manifest["prompt_input"] == "prompt_ids"
    assert manifest["model"]["max_user_tokens"] == 128 - 8
    names = [i["name"] for i in manifest["graphs"]["model"]["inputs"]]
    assert "prompt_ids" in names
    report = manifest["parity"]
    assert report["passed"] and report["greedy_tokens_equal"]
    assert set(report["adapters"]) == set(ADAPTERS)
    assert max(report["max_abs_diff"].values()) <= 1e-4
    assert report["negative_control"]["failed_as_expected"]
    assert report["negative_control"]["min_row_max_abs_diff"] > 100 * 1e-4
    assert manifest["golden"]["cases"] == 1 and manifest["golden"]["greedy_steps"] == 8


def test_golden_checks_the_folder_without_torch_and_sees_a_wrong_prompt_id(built, tmp_path, capsys):
    """golden.npz (the mixed batch, with prompt ids) through the runtime; then the same golden with the rows'
    prompt ids rotated (rehashed, so only the ids changed) must fail."""
    from ptuning_onnx.cli.verify import main
    from ptuning_onnx.runtime.golden import verify_golden

    report = verify_golden(built["multi"].path)
    assert report["passed"] and report["token_agreement"] == 1.0
    assert max(report["max_abs_diff"].values()) <= 1e-4 and report["negative_control"]["failed_as_expected"]
    assert main([str(built["multi"].path)]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
    rotated_golden_fails(built["multi"].path, tmp_path, 3)


def test_each_row_equals_its_adapters_single_export(built):
    """ONNX against ONNX: a mixed, padded batch of the multi-prompt folder against each adapter's own folder on
    the row alone (logits of the real positions, and greedy tokens through the KV cache)."""
    from ptuning_onnx import runtime

    multi = runtime.load(built["multi"].path)
    singles = {name: runtime.load(path) for name, path in built["singles"].items()}
    ids, mask, names = _mixed()
    logits = multi.forward(ids, mask, adapters=names)["logits"]
    tokens = multi.generate(input_ids=ids, attention_mask=mask, adapters=names, max_new_tokens=10, eos_token_id=[])
    wrong = multi.forward(ids, mask, adapters=names[1:] + names[:1])["logits"]
    for row, name in enumerate(names):
        alone = ids[row:row + 1, mask[row] == 1]
        want = singles[name].forward(alone)["logits"][0]
        assert np.abs(logits[row, mask[row] == 1] - want).max() <= 1e-4
        np.testing.assert_array_equal(tokens[row], singles[name].generate(input_ids=alone, max_new_tokens=10,
                                                                          eos_token_id=[])[0])
        # Negative control: the same row with another adapter's prompt is far from this adapter's output.
        assert np.abs(wrong[row, mask[row] == 1] - want).max() > 1e-2


def test_runtime_adapter_arguments(built):
    from ptuning_onnx import runtime
    from ptuning_onnx.runtime.validation import InputError

    model = runtime.load(built["multi"].path)
    assert model.adapters == {"news": 0, "chat": 1, "code": 2}
    ids = np.random.default_rng(1).integers(5, 1000, (2, 4))
    same = model.generate(input_ids=ids, adapter="chat", max_new_tokens=3, eos_token_id=[])
    np.testing.assert_array_equal(same, model.generate(input_ids=ids, adapters=["chat", "chat"], max_new_tokens=3,
                                                       eos_token_id=[]))
    assert isinstance(model.generate("hello there", adapter="code", max_new_tokens=3), str)
    assert len(list(model.stream("hello", adapter="news", max_new_tokens=3))) >= 1
    with pytest.raises(InputError, match=r"holds 3 prompts \(news, chat, code\)"):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(InputError, match=r"unknown adapter\(s\) 'nope'.*holds: news, chat, code"):
        model.generate(input_ids=ids, adapter="nope", max_new_tokens=2)
    with pytest.raises(InputError, match="1 names for a batch of 2"):
        model.generate(input_ids=ids, adapters=["news"], max_new_tokens=2)
    with pytest.raises(InputError, match="one of the two"):
        model.generate(input_ids=ids, adapter="news", adapters=["news", "chat"], max_new_tokens=2)
    single = runtime.load(built["singles"]["news"])
    with pytest.raises(InputError, match="single-adapter export"):
        single.generate(input_ids=ids, adapter="news", max_new_tokens=2)


def test_parity_gate_fails_when_adapters_are_swapped(built):
    """The gate can fail: the same folder checked against references in the wrong order raises."""
    from ptuning_onnx import manifest as mf
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export.multi import load_references
    from ptuning_onnx.parity_multi import check_multi

    refs, _ = load_references(MODELS / "gpt2", built["adapters"])
    swapped = dict(zip(refs, [refs["chat"], refs["news"], refs["code"]], strict=True))
    manifest = mf.read_manifest(built["multi"].path)
    with pytest.raises(ParityError, match="differs from its adapter alone") as info:
        check_multi(built["multi"].path, swapped, manifest)
    assert info.value.report["max_abs_diff"]["logits"] > 1e-2


def test_feature_extraction_rows_equal_their_single_exports(tmp_path):
    from ptuning_onnx import runtime
    from ptuning_onnx.export import export
    from ptuning_onnx.export.multi import export_multi

    adapters = {}
    for name, (encoder, n, seed) in list(ADAPTERS.items())[:2]:
        make_peft_adapter(tmp_path / name, MODELS / "bert", "FEATURE_EXTRACTION", "AutoModel", encoder=encoder,
                          num_virtual_tokens=n, seed=seed)
        adapters[name] = tmp_path / name
    result = export_multi(MODELS / "bert", adapters, tmp_path / "multi", progress=False)
    assert result.report["passed"] and result.report["negative_control"]["failed_as_expected"]
    multi = runtime.load(result.path)
    texts = ["a good movie", "bad", "the plot was thin but fun", "ok"]
    names = ["news", "chat", "chat", "news"]
    vectors = multi.embed(texts, adapters=names)
    wrong = multi.embed(texts, adapters=[{"news": "chat", "chat": "news"}[n] for n in names])
    for name, path in adapters.items():
        single = runtime.load(export(MODELS / "bert", path, tmp_path / f"single-{name}", progress=False,
                                     skip_verify=True).path)
        for row, (text, chosen) in enumerate(zip(texts, names, strict=True)):
            if chosen == name:
                want = single.embed(text)
                assert np.abs(vectors[row] - want).max() <= 1e-4
                assert np.abs(wrong[row] - want).max() > 1e-3


def test_mismatched_adapters_are_refused_naming_the_adapter(built, tmp_path):
    from ptuning_onnx.errors import ConfigError
    from ptuning_onnx.export.multi import export_multi, parse_adapter_specs

    good = built["adapters"]["news"]
    make_peft_adapter(tmp_path / "embed", MODELS / "gpt2", "FEATURE_EXTRACTION", "AutoModel")
    with pytest.raises(ConfigError, match="adapter 'embed' is for task feature-extraction but 'news' is for causal-lm"):
        export_multi(MODELS / "gpt2", {"news": good, "embed": tmp_path / "embed"}, tmp_path / "o1", progress=False)
    # An adapter trained on another base (the tiny Llama: same hidden size, so only its config tells).
    make_peft_adapter(tmp_path / "llama", MODELS / "llama", "CAUSAL_LM", "AutoModelForCausalLM")
    with pytest.raises(ConfigError, match="adapter 'other' was trained on .*llama, whose config.json differs"):
        export_multi(MODELS / "gpt2", {"news": good, "other": tmp_path / "llama"}, tmp_path / "o2", progress=False)
    with pytest.raises(ConfigError, match="adapter 'gone'"):
        export_multi(MODELS / "gpt2", {"news": good, "gone": tmp_path / "missing"}, tmp_path / "o4", progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapter_specs(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="NAME=DIR"):
        parse_adapter_specs(["a=x", "justapath"])
    assert not any(p.name.startswith(("o1", "o2", "o4")) for p in tmp_path.iterdir())


def test_cli_multi_and_single(built, tmp_path, capsys):
    from ptuning_onnx.cli.export import main

    news, chat = built["adapters"]["news"], built["adapters"]["chat"]
    base = ["--base-model", str(MODELS / "gpt2"), "--quiet"]
    assert main([*base, "--adapter", f"news={news}", "--adapter", f"chat={chat}", "--output",
                 str(tmp_path / "m")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapters"] == {"news": 0, "chat": 1} and summary["parity"]["passed"]
    # A single --adapter DIR keeps today's folder: no prompt_ids, no adapters map.
    assert main([*base, "--adapter", str(news), "--output", str(tmp_path / "s"), "--skip-verify"]) == 0
    manifest = json.loads((tmp_path / "s" / "ptuning_onnx.json").read_text())
    assert "adapters" not in manifest and "prompt_input" not in manifest
    assert "prompt_ids" not in [i["name"] for i in manifest["graphs"]["model"]["inputs"]]
    import shutil

    odd = tmp_path / "lr=0.1"  # one adapter folder whose name has '=': still a single export
    shutil.copytree(news, odd)
    assert main([*base, "--adapter", str(odd), "--output", str(tmp_path / "s2"), "--skip-verify"]) == 0
    assert "adapters" not in json.loads((tmp_path / "s2" / "ptuning_onnx.json").read_text())
    capsys.readouterr()
    code = main([*base, "--adapter", f"news={news}", "--adapter", f"chat={chat}", "--quantize", "int8",
                 "--dtype", "fp16", "--output", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --quantize int8 works on fp32 graphs; drop --dtype fp16"
    code = main([*base, "--adapter", f"news={news}", "--adapter", f"news={chat}", "--output", str(tmp_path / "d")])
    assert code == 2 and "given twice" in capsys.readouterr().err
