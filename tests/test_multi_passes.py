"""Multi-prompt exports through the single export's passes: ``--quantize int8|int4``, ``--dtype fp16``,
``--optimize``. Quantized folders pass the fp32 graph's exact multi-prompt check first, then the quantized gate per
adapter (each adapter's rows against its own reference, judged against its own prompt's effect); fp16 folders are
held to fp16's bound per adapter in a mixed batch. Every check has its negative control, and golden.npz replays it
without torch. Real PEFT adapters, real onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MODELS, make_gpt2_adapters, make_peft_adapter, rotated_golden_fails

CAUSAL = {"news": ("MLP", 20, 0), "chat": ("LSTM", 12, 1)}  # int4 needs a prompt whose effect int4 noise stays under


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    return make_gpt2_adapters(tmp_path_factory.mktemp("passes-adapters"), CAUSAL)


def test_int4_causal_lm_is_gated_per_adapter(gpt2_adapters, tmp_path):
    from ptuning_onnx import runtime
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export.multi import export_multi, load_references
    from ptuning_onnx.parity import verify
    from ptuning_onnx.parity_multi import check_quantized_multi
    from ptuning_onnx.runtime.golden import verify_golden

    result = export_multi(MODELS / "gpt2", gpt2_adapters, tmp_path / "int4", quantize="int4", progress=False)
    report, manifest = result.report, result.manifest
    assert manifest["quantize"] == "int4" and report["gate"] == "quantized"
    assert report["fp32_exact"]["passed"] and report["fp32_exact"]["max_abs_diff"]["logits"] <= 1e-4
    assert set(report["adapters"]) == set(CAUSAL)
    for entry in report["adapters"].values():
        assert entry["passed"] and max(entry["relative_error"].values()) <= 0.75
        assert entry["negative_control"]["failed_as_expected"]
    # golden.npz holds every adapter's rows, with their prompt ids; a wrong id fails it
    golden = verify_golden(result.path)
    assert golden["passed"] and golden["gate"] == "quantized"
    rotated_golden_fails(result.path, tmp_path, len(CAUSAL))
    # the gate can fail: the same folder against swapped references
    refs, _ = load_references(MODELS / "gpt2", gpt2_adapters)
    with pytest.raises(ParityError, match="adapter 'news'"):
        check_quantized_multi(result.path, dict(zip(refs, [refs["chat"], refs["news"]], strict=True)), manifest)
    assert verify(result.path)["gate"] == "quantized"  # ptuning-verify --reference: the same gate per adapter
    model = runtime.load(result.path)
    ids = np.random.default_rng(0).integers(5, 1000, (2, 6))
    assert model.generate(input_ids=ids, adapters=["news", "chat"], max_new_tokens=4).shape == (2, 4)


def test_fp16_and_optimize_causal_lm_mixed_batch(gpt2_adapters, tmp_path):
    from ptuning_onnx.runtime.golden import verify_golden

    result = export_multi_cli(gpt2_adapters, tmp_path / "fp16", "--dtype", "fp16", "--optimize")
    manifest = json.loads((result / "ptuning_onnx.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["optimization"]["recipe"] == "gpt2"
    report = manifest["parity"]
    assert report["passed"] and report["rtol"] == 0.02 and report["greedy_tokens_equal"]
    for name, value in report["max_abs_diff"].items():
        assert value <= report["tolerance"][name] < report["negative_control"]["min_row_max_abs_diff"]
    assert verify_golden(result, provider="cpu")["passed"]
    rotated_golden_fails(result, tmp_path, len(CAUSAL))


def export_multi_cli(adapters: dict, output, *flags) -> object:
    """Through ``ptuning-export``'s main, as a user would; returns the folder."""
    from ptuning_onnx.cli.export import main

    args = ["--base-model", str(MODELS / "gpt2"), "--output", str(output), "--quiet", *flags]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    assert main(args) == 0
    return output


def test_int8_seq_cls_with_its_own_heads(tmp_path):
    """seq-cls int8 + --optimize: each adapter's head (2 and 3 labels) judged by the quantized gate; the runtime
    cuts each row to its adapter's labels, close to the fp32 folder's."""
    from ptuning_onnx import runtime
    from ptuning_onnx.export.multi import export_multi
    from ptuning_onnx.runtime.golden import verify_golden

    adapters = {}
    for name, (encoder, n, seed, labels) in {"sentiment": ("MLP", 20, 0, 2), "topic": ("LSTM", 12, 1, 3)}.items():
        make_peft_adapter(tmp_path / name, MODELS / "bert", "SEQ_CLS", "AutoModelForSequenceClassification",
                          encoder=encoder, num_virtual_tokens=n, seed=seed, num_labels=labels)
        adapters[name] = tmp_path / name
    result = export_multi(MODELS / "bert", adapters, tmp_path / "int8", quantize="int8", optimize=True,
                          progress=False)
    fp32 = export_multi(MODELS / "bert", adapters, tmp_path / "fp32", progress=False)
    report = result.report
    assert report["passed"] and set(report["adapters"]) == set(adapters)
    assert all(e["relative_error"]["logits"] <= 0.75 for e in report["adapters"].values())
    assert verify_golden(result.path)["passed"]
    rotated_golden_fails(result.path, tmp_path, 2)
    texts = ["a good film", "bad", "the plot was thin but fun"]
    names = ["topic", "sentiment", "topic"]
    got = runtime.load(result.path).classify(texts, adapters=names)
    want = runtime.load(fp32.path).classify(texts, adapters=names)
    for g, w in zip(got, want, strict=True):
        assert len(g["logits"]) == len(w["logits"])
        assert np.abs(np.array(g["logits"]) - w["logits"]).max() < 0.25 * np.abs(w["logits"]).max()


def test_fused_attention_keeps_the_2d_mask_in_multi_prompt_graphs(tmp_path):
    """--optimize's BERT recipe turns the mask into one end index per row, which a multi-prompt graph breaks: a
    shorter prompt's masked slots sit BEFORE the user's tokens. The multi export fuses with the raw 2-D mask; forced
    fused here (the export keeps whichever graph times faster), that graph passes the exact check and the end-index
    one fails it (the control)."""
    import shutil

    from ptuning_onnx import manifest as mf
    from ptuning_onnx.errors import ParityError
    from ptuning_onnx.export import graph_io
    from ptuning_onnx.export.fusion import _fuse_one
    from ptuning_onnx.export.multi import export_multi, load_references
    from ptuning_onnx.parity_multi import check_multi

    adapters = {}
    for name, (encoder, n, seed) in {"long": ("MLP", 8, 0), "short": ("LSTM", 3, 1)}.items():
        make_peft_adapter(tmp_path / name, MODELS / "bert", "FEATURE_EXTRACTION", "AutoModel", encoder=encoder,
                          num_virtual_tokens=n, seed=seed)
        adapters[name] = tmp_path / name
    folder = export_multi(MODELS / "bert", adapters, tmp_path / "multi", skip_verify=True, progress=False).path
    refs, _ = load_references(MODELS / "bert", adapters)
    manifest = mf.read_manifest(folder, verify=False)
    shutil.copy(folder / "model.onnx", tmp_path / "unfused.onnx")
    for raw in (True, False):
        fused = _fuse_one(folder / "model.onnx", folder / "fused.onnx", "bert", 4, 64, None, raw)
        assert fused.get("Attention", 0) > 0
        graph_io.move(folder / "fused.onnx", folder / "model.onnx")
        if raw:
            assert check_multi(folder, refs, manifest)["max_abs_diff"]["last_hidden_state"] <= 1e-4
        else:
            with pytest.raises(ParityError, match="differs from its adapter alone"):
                check_multi(folder, refs, manifest)
        shutil.copy(tmp_path / "unfused.onnx", folder / "model.onnx")
