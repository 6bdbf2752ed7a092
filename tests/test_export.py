"""Export: every task, PEFT-written and our own adapters, more architectures, optimum compatibility, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import MODELS, TASKS, make_peft_adapter, reference_vs_peft
from ptuning_onnx import manifest as mf
from ptuning_onnx.adapter import Adapter, load_adapter, save_adapter
from ptuning_onnx.cli import export as export_cli
from ptuning_onnx.cli import verify as verify_cli
from ptuning_onnx.config import PromptEncoderConfig
from ptuning_onnx.errors import AdapterError, ConfigError, ExportError, ManifestError, ParityError
from ptuning_onnx.export import export, load_reference
from ptuning_onnx.parity import assert_parity, verify

EXPECTED_INPUTS = {
    "causal-lm": ["input_ids", "attention_mask", "position_ids"],
    "seq-cls": ["input_ids", "attention_mask", "token_type_ids"],
    "token-cls": ["input_ids", "attention_mask", "token_type_ids"],
    "feature-extraction": ["input_ids", "attention_mask", "token_type_ids"],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_export_parity_every_task(exports, task):
    folder = exports[task]
    manifest = mf.read_manifest(folder, verify=True)
    report = manifest["parity"]
    assert report["passed"] is True
    assert report["max_abs_diff"] and max(report["max_abs_diff"].values()) <= 1e-4
    # The negative control ran and failed by a wide margin.
    assert report["negative_control"]["failed_as_expected"] is True
    assert max(report["negative_control"]["max_abs_diff"].values()) > 100 * report["atol"]
    assert report["cases"] >= 5
    assert report["padding_invariant"]["passed"] is True and manifest["model"]["padding_invariant"] is True
    assert set(manifest["files"]) >= {"config.json", "tokenizer.json"}
    assert manifest["exporter"] and manifest["versions"]["torch"]
    graph_names = {"seq2seq-lm": {"encoder_model", "decoder_model"}}.get(task, {"model"})
    assert set(manifest["graphs"]) == graph_names
    for graph in manifest["graphs"].values():
        assert (folder / graph["file"]).is_file()
    kind = "causal-lm" if task.startswith("causal") else task
    if kind in EXPECTED_INPUTS:
        inputs = [i["name"] for i in manifest["graphs"]["model"]["inputs"]]
        assert inputs[: len(EXPECTED_INPUTS[kind])] == EXPECTED_INPUTS[kind]
    if kind == "causal-lm":
        assert "logits_to_keep" in inputs and inputs[3] == "past_key_values.0.key"
        assert report["greedy_steps"] == 16


def test_exported_graph_has_no_prompt_encoder_and_no_adapter_input(exports):
    import onnx

    model = onnx.load(str(exports["causal-lm"] / "model.onnx"))
    inputs = {i.name for i in model.graph.input}
    assert not any("prompt" in name for name in inputs)
    assert not any(op.op_type == "LSTM" for op in model.graph.node)


def test_verify_detects_wrong_adapter(exports, peft_adapters, tmp_path):
    """The exported graph checked against a DIFFERENT prompt must fail (the check sees the prompt)."""
    adapter = load_adapter(peft_adapters["causal-lm"])
    # A small random change (a uniform shift would be invisible: LayerNorm removes the mean of each vector).
    noise = torch.randn(adapter.prompt_embeddings.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    other = Adapter(adapter.config, adapter.prompt_embeddings + noise, adapter.head_weights)
    save_adapter(tmp_path / "other", other)
    with pytest.raises(ParityError, match="differs from the PyTorch reference"):
        verify(exports["causal-lm"], base_model=MODELS / "gpt2", adapter=tmp_path / "other")
    report = verify(exports["causal-lm"], base_model=MODELS / "gpt2", adapter=peft_adapters["causal-lm"],
                    report=tmp_path / "r.json")
    assert report["passed"] and json.loads((tmp_path / "r.json").read_text())["passed"]
    assert_parity(exports["causal-lm"])


def test_verify_detects_tampered_graph(exports, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exports["seq-cls"], copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="modified after export"):
        verify(copy)
    assert verify_cli.main([str(copy)]) == 2


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_our_adapter_exports_and_peft_agrees(tmp_path, encoder):
    """An adapter written by us (not PEFT) exports; PEFT loading the same adapter gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ptuning_onnx.encoder import PromptEncoder
    from ptuning_onnx.reference import load_base

    torch.manual_seed(1)
    base = load_base(MODELS / "llama", "CAUSAL_LM")
    cfg = PromptEncoderConfig(num_virtual_tokens=7, task_type="CAUSAL_LM", encoder_reparameterization_type=encoder,
                              encoder_hidden_size=24).fill_from_model_config(base.config)
    enc = PromptEncoder(cfg)
    save_adapter(tmp_path / "ad", Adapter(cfg, enc.bake()))
    result = export(MODELS / "llama", tmp_path / "ad", tmp_path / "out", progress=False)
    assert result.report["passed"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODELS / "llama"), tmp_path / "ad")
    ids = torch.randint(4, 1000, (2, 9))
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 7:]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64),
            "position_ids": np.tile(np.arange(9), (2, 1))}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feed[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feed)[0]
    assert np.abs(got - want.numpy()).max() < 1e-4
    # negative control: PEFT with a slightly different prompt is told apart by the same tolerance
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.add_(torch.randn(7, 64) * 0.05)
        other = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 7:]
    assert np.abs(got - other.numpy()).max() > 1e-4


# Tiny random architectures beyond models/, each a different way of doing positions or heads:
# Qwen2 (GQA + rotary), OPT (learned positions with its own offset of 2), Bloom (ALiBi, no position input),
# RoBERTa (position table indexed from
# pad_token_id + 1), DistilBERT (no token_type_ids, `dim` not `hidden_size`), BART (encoder-decoder, learned positions).
ARCHS = {
    "qwen2": ("CAUSAL_LM", "AutoModelForCausalLM",
              dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, max_position_embeddings=256)),
    "opt": ("CAUSAL_LM", "AutoModelForCausalLM",
            dict(vocab_size=300, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, word_embed_proj_dim=48)),
    "bloom": ("CAUSAL_LM", "AutoModelForCausalLM",  # ALiBi: no position_ids at all
              dict(vocab_size=300, hidden_size=48, n_layer=2, n_head=4)),
    "roberta": ("SEQ_CLS", "AutoModelForSequenceClassification",
                dict(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     max_position_embeddings=130, pad_token_id=1)),
    "distilbert": ("SEQ_CLS", "AutoModelForSequenceClassification",
                   dict(vocab_size=300, dim=48, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=128)),
    "bart": ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM",
             dict(vocab_size=300, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128)),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_more_architectures(tmp_path, arch):
    """Same code path, no per-model list: export parity, and the reference equals PEFT on unpadded rows."""
    import transformers
    from transformers import AutoConfig

    peft_task, auto, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    getattr(transformers, auto).from_config(AutoConfig.for_model(arch, **kwargs)).save_pretrained(tmp_path / arch)
    num_labels = 2 if peft_task == "SEQ_CLS" else None
    peft_model, _ = make_peft_adapter(tmp_path / "ad", tmp_path / arch, peft_task, auto, encoder="LSTM",
                                      num_labels=num_labels)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        result = export(tmp_path / arch, tmp_path / "ad", tmp_path / "out", progress=False)
    assert result.report["passed"]
    assert max(result.report["max_abs_diff"].values()) < 1e-4

    ref = load_reference(tmp_path / arch, tmp_path / "ad")
    got, want = reference_vs_peft(peft_model, ref, 300, seq2seq=peft_task == "SEQ_2_SEQ_LM",
                                  slice_peft=peft_task == "CAUSAL_LM")
    assert got.shape == want.shape
    # fp32 rounding scales with magnitude (the randomised head gives logits near 35): 1e-5 per unit of scale
    assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))


def test_dynamo_route_needs_no_optimum_patcher(peft_adapters, tmp_path):
    """The fallback route for transformers versions optimum does not support: same interface, same parity."""
    result = export(MODELS / "llama", peft_adapters["causal-lm-llama"], tmp_path / "out", progress=False,
                    exporter="dynamo")
    assert result.manifest["exporter"] == "dynamo" and result.report["passed"]
    assert max(result.report["max_abs_diff"].values()) < 1e-4
    with pytest.raises(ConfigError, match="unknown exporter 'jit'"):
        export(MODELS / "llama", peft_adapters["causal-lm-llama"], tmp_path / "o2", progress=False, exporter="jit")


@pytest.mark.parametrize("task,cls", [("causal-lm", "ORTModelForCausalLM"),
                                      ("seq-cls", "ORTModelForSequenceClassification"),
                                      ("token-cls", "ORTModelForTokenClassification")])
def test_optimum_loads_exported_folder(exports, peft_adapters, task, cls):
    import optimum.onnxruntime as ortm

    folder = exports[task]
    model_dir = MODELS / TASKS[task][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"use_cache": True} if task == "causal-lm" else {}
        model = getattr(ortm, cls).from_pretrained(folder, use_io_binding=False, **kwargs)
    ref = load_reference(model_dir, peft_adapters[task])
    ids = torch.randint(5, 1000, (2, 6))
    mask = torch.ones_like(ids)
    extra = {} if task == "causal-lm" else {"token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **extra).logits
        want = ref(ids, mask, *extra.values()).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
    if task == "causal-lm":
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                do_sample=False)[:, 6:]
        assert torch.equal(tokens, ref.greedy(ids, mask, 8))


# ---- output folder safety ---------------------------------------------------------------------------------


def test_existing_output_refused_then_overwrite_keeps_foreign_files(peft_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export(MODELS / "bert", peft_adapters["seq-cls"], out, progress=False, skip_verify=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export(MODELS / "bert", peft_adapters["seq-cls"], out, progress=False, overwrite=True, skip_verify=True)
    export(MODELS / "bert", peft_adapters["seq-cls"], out, progress=False, overwrite=True, skip_verify=True)
    assert (out / "notes.txt").read_text() == "mine"
    mf.read_manifest(out, verify=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folders left behind


def test_failed_parity_leaves_no_folder(peft_adapters, tmp_path):
    with pytest.raises(ParityError):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", atol=1e-12, progress=False)
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.parity-report.json").read_text())
    assert report["passed"] is False and "max_abs_diff" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_killed_export_leaves_nothing_that_looks_valid(peft_adapters, tmp_path):
    """SIGKILL the exporter as soon as its graph exists (parity still to run): nothing may look like an export,
    and the next export cleans up the dead process's temporary folder."""
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ptuning_onnx.cli.export", "--base-model", str(MODELS / "t5"),
                             "--adapter", str(peft_adapters["seq2seq-lm"]), "--output", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/decoder_model.onnx")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -9, "the export finished before it could be killed"
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert leftovers and not any((p / mf.MANIFEST_NAME).exists() for p in leftovers)
    export(MODELS / "t5", peft_adapters["seq2seq-lm"], out, progress=False, skip_verify=True)
    assert not list(tmp_path.glob(".out.tmp-*"))  # the dead writer's folder is gone


def test_output_that_is_the_current_folder_is_refused(peft_adapters, tmp_path, monkeypatch):
    """`--output .` (or a parent of it) must not move or delete the user's files."""
    for i in range(5):
        (tmp_path / f"user-{i}.txt").write_text(str(i))
    monkeypatch.chdir(tmp_path)
    for output in (".", ".."):
        with pytest.raises(ConfigError, match="current folder"):
            export(MODELS / "bert", peft_adapters["seq-cls"], output, overwrite=True, progress=False)
        assert export_cli.main(["--base-model", str(MODELS / "bert"), "--adapter", str(peft_adapters["seq-cls"]),
                                "--output", output, "--overwrite", "--quiet"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"user-{i}.txt" for i in range(5)]


def test_foreign_file_that_would_be_replaced_is_refused(peft_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's own")
    with pytest.raises(ConfigError, match="tokenizer.json, which this write did not make"):
        export(MODELS / "bert", peft_adapters["seq-cls"], out, overwrite=True, skip_verify=True, progress=False)
    assert (out / "tokenizer.json").read_text() == "the user's own"
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


# ---- bad input ---------------------------------------------------------------------------------------------


def test_token_dim_mismatch_names_both_numbers(tmp_path):
    cfg = PromptEncoderConfig(num_virtual_tokens=3, token_dim=32, task_type="CAUSAL_LM")
    save_adapter(tmp_path / "ad", Adapter(cfg, torch.zeros(3, 32)))
    with pytest.raises(ConfigError, match=r"token_dim is 32 .* hidden size 64"):
        export(MODELS / "gpt2", tmp_path / "ad", tmp_path / "out", progress=False)


def test_pickle_only_adapter_refused(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(b"not really a pickle")
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="pickle"):
        export(MODELS / "gpt2", tmp_path / "ad", tmp_path / "out", progress=False)


def test_unsupported_task_for_architecture(peft_adapters, tmp_path):
    with pytest.raises(ExportError, match="bert.*cannot be exported for task CAUSAL_LM"):
        export(MODELS / "bert", peft_adapters["causal-lm"], tmp_path / "out", progress=False)
    with pytest.raises(ExportError, match="bert.*cannot be exported for task CAUSAL_LM"):
        export(MODELS / "bert", peft_adapters["causal-lm"], tmp_path / "out", progress=False, exporter="dynamo")
    assert not (tmp_path / "out").exists()


def test_classification_without_head_weights_is_refused(peft_adapters, tmp_path):
    """A seq-cls export whose fresh head comes from neither checkpoint nor adapter would be a random classifier."""
    with pytest.raises(ConfigError, match="no trained weights for classification_head.*head would be random"):
        export(MODELS / "t5", peft_adapters["seq2seq-lm"], tmp_path / "out", task="seq-cls", progress=False)


def test_cuda_parity_without_cuda_provider_is_a_clear_error(peft_adapters, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
        export(MODELS / "bert", peft_adapters["seq-cls"], tmp_path / "o", device="cuda", progress=False)
    assert not (tmp_path / "o").exists()


def test_unknown_task_and_missing_files(peft_adapters, tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'translate'"):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "o", task="translate", progress=False)
    with pytest.raises(AdapterError, match="not found"):
        export(MODELS / "gpt2", tmp_path / "nope", tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="no config.json"):
        export(tmp_path, peft_adapters["causal-lm"], tmp_path / "o", progress=False)


def _error_lines(err: str) -> list:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if not line.startswith("[ptuning-onnx]")]


def test_unreadable_base_config_and_labels_file(peft_adapters, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(MODELS / "gpt2", base)
    (base / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        export(base, peft_adapters["causal-lm"], tmp_path / "o", progress=False)
    ad = tmp_path / "ad"
    shutil.copytree(peft_adapters["seq-cls"], ad)
    (ad / "labels.json").write_text('["a", "b"]')
    with pytest.raises(AdapterError, match="labels.json must be"):
        export(MODELS / "bert", ad, tmp_path / "o", progress=False)
    for base_dir, adapter in ((base, peft_adapters["causal-lm"]), (MODELS / "bert", ad),
                              (MODELS / "bert", peft_adapters["causal-lm"])):
        code = export_cli.main(["--base-model", str(base_dir), "--adapter", str(adapter), "--output",
                                str(tmp_path / "o"), "--quiet"])
        lines = _error_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_cli_errors_are_one_line(peft_adapters, tmp_path, capsys):
    code = export_cli.main(["--base-model", str(MODELS / "gpt2"), "--adapter", str(tmp_path / "missing"),
                            "--output", str(tmp_path / "o")])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: adapter folder not found")
    code = export_cli.main(["--base-model", str(MODELS / "gpt2"), "--adapter", str(peft_adapters["causal-lm"]),
                            "--output", str(tmp_path / "o"), "--atol", "1e-12", "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: parity check failed")
    assert export_cli.main(["--base-model", str(MODELS / "gpt2")]) == 2  # argparse usage error
    capsys.readouterr()
    for flags, message in ((["--quantize", "int4", "--int4-block-size", "48"], "error: int4 block size must be one of"),
                           (["--int4-block-size", "128"], "error: --int4-block-size goes with --quantize int4")):
        code = export_cli.main(["--base-model", str(MODELS / "gpt2"), "--adapter", str(peft_adapters["causal-lm"]),
                                "--output", str(tmp_path / "o"), "--quiet", *flags])
        lines = _error_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(message)
    assert not (tmp_path / "o").exists()


def test_cli_export_and_verify(peft_adapters, tmp_path, capsys):
    out = tmp_path / "o"
    assert export_cli.main(["--base-model", str(MODELS / "bert"), "--adapter", str(peft_adapters["token-cls"]),
                            "--output", str(out), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["passed"] is True
    assert verify_cli.main([str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["negative_control"]["failed_as_expected"]


@pytest.mark.parametrize("module", ["export", "verify"])
def test_cli_subprocess_smoke(module):
    proc = subprocess.run([sys.executable, "-m", f"ptuning_onnx.cli.{module}", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and f"ptuning-{module}" in proc.stdout


@pytest.mark.parametrize("options,task", [(dict(dtype="fp16"), "seq-cls"), (dict(dtype="fp16"), "seq2seq-lm"),
                                          (dict(dtype="fp16"), "causal-lm-llama"), (dict(optimize=True), "causal-lm")])
def test_dtype_and_optimization_passes_keep_parity(peft_adapters, tmp_path, options, task):
    """fp16 conversion and graph optimization rewrite the graph; parity runs on the rewritten graph, at the
    documented tolerance for each (1e-4 fp32, 1e-2 + 2% of scale fp16), and its negative control still fails.
    Quantized graphs have their own gate: tests/test_quantized_gate.py."""
    from ptuning_onnx.parity import default_atol, default_rtol

    model = TASKS[task][0]
    result = export(MODELS / model, peft_adapters[task], tmp_path / "out", progress=False, **options)
    report = result.report
    assert report["atol"] == default_atol(options.get("dtype", "fp32"))
    assert report["rtol"] == default_rtol(options.get("dtype", "fp32"))
    assert report["passed"] and report["negative_control"]["failed_as_expected"]
    assert result.manifest["dtype"] == options.get("dtype", "fp32")
    if "dtype" in options:
        import onnx

        graph = onnx.load(str(tmp_path / "out" / next(iter(result.manifest["graphs"].values()))["file"])).graph
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


@pytest.mark.parametrize("task,quantize", [("causal-lm", None), ("seq-cls", None), ("causal-lm-llama", "int4")])
def test_optimize_fuses_times_and_keeps_the_faster(peft_adapters, tmp_path, task, quantize):
    """--optimize: onnxruntime's fusions are applied, fused and unfused graphs are timed on the task's workload, the
    faster is kept and the decision is in the manifest; parity runs on what was kept (and int4 on top of it)."""
    import onnx

    result = export(MODELS / TASKS[task][0], peft_adapters[task], tmp_path / "out", optimize=True, quantize=quantize,
                    progress=False)
    decision = result.manifest["optimization"]
    assert result.report["passed"] and decision["fused_ops"]["model"]
    assert decision["kept"] == ("fused" if decision["ms"]["fused"] < decision["ms"]["unfused"] else "unfused")
    assert result.manifest["optimized"] == (decision["kept"] == "fused")
    ops = {node.op_type for node in onnx.load(str(result.path / "model.onnx")).graph.node}
    contrib = set(decision["fused_ops"]["model"]) - {"LayerNormalization"}  # a standard op since opset 17
    assert bool(ops & contrib) == (decision["kept"] == "fused")
    assert sorted(p.name for p in result.path.iterdir()) == sorted([*result.manifest["files"], "ptuning_onnx.json"])


def test_optimize_keeps_the_unfused_graph_when_the_fused_one_cannot_run_on_the_cpu(peft_adapters, tmp_path):
    """onnxruntime's T5 recipe fuses RelativePositionBias, which its CPU provider has no kernel for: the export keeps
    the unfused graphs, passes parity, and says why, instead of failing."""
    result = export(MODELS / "t5", peft_adapters["seq2seq-lm"], tmp_path / "out", optimize=True, progress=False)
    decision = result.manifest["optimization"]
    assert decision["kept"] == "unfused" and decision["ms"] is None
    assert "RelativePositionBias" in decision["reason"] and "CPU provider" in decision["reason"]
    assert result.report["passed"] and not result.manifest["optimized"]
