"""The quantized gate (parity_quantized.py, docs/FORMAT.md): int8 and int4 exports pass it with default flags, and
it still fails a wrong prompt, a prompt at the wrong positions and a graph that drops one virtual token."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MODELS, TASKS

from ptuning_onnx.errors import ParityError
from ptuning_onnx.export import export, wrappers
from ptuning_onnx.export.exporter import load_reference
from ptuning_onnx.parity import perturbed
from ptuning_onnx.parity_quantized import REL_LIMIT, check_quantized
from ptuning_onnx import manifest as mf
from ptuning_onnx.reference import PTuningModel


@pytest.mark.parametrize("quantize,task", [("int8", "causal-lm"), ("int4", "causal-lm"), ("int4", "causal-lm-llama"), ("int4", "seq-cls"),
                                           ("int8", "causal-lm-llama"), ("int8", "seq2seq-lm"), ("int8", "seq-cls")])
def test_quantized_exports_pass_the_gate(peft_adapters, tmp_path, quantize, task):
    result = export(MODELS / TASKS[task][0], peft_adapters[task], tmp_path / "out", quantize=quantize,
                    progress=False)
    report = result.report
    assert report["gate"] == "quantized" and report["passed"]
    # The graph it was made from passed the exact gate first, and that report is kept.
    assert report["fp32_exact"]["passed"] and max(report["fp32_exact"]["max_abs_diff"].values()) < 1e-4
    assert all(0 < v <= REL_LIMIT for v in report["relative_error"].values())  # really quantized, inside the gate
    assert all(v > REL_LIMIT for v in report["negative_control"]["relative_error"].values())
    assert result.manifest["quantize"] == quantize and result.manifest["parity"] == report
    graph = mf.graph_path(result.path, result.manifest, next(iter(result.manifest["graphs"])))
    import onnx

    ops = {node.op_type for node in onnx.load(str(graph)).graph.node}
    assert ("MatMulNBits" if quantize == "int4" else "MatMulInteger") in ops


@pytest.mark.parametrize("block_size", [32, 128])
def test_int4_quantizes_the_lm_head(peft_adapters, tmp_path, block_size):
    """Every constant MatMul, the lm_head included, with the block size asked for (--int4-block-size), recorded in
    the manifest; the quantized gate passes at either size."""
    import onnx
    from onnx import helper

    result = export(MODELS / "llama", peft_adapters["causal-lm-llama"], tmp_path / "out", quantize="int4",
                    progress=False, int4_block_size=block_size)
    assert result.report["passed"]
    assert result.manifest["quantization"] == {"method": "MatMulNBits", "bits": 4, "block_size": block_size,
                                               "symmetric": True, "accuracy_level": 4}
    graph = onnx.load(str(result.path / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    assert producers["logits"].op_type == "MatMulNBits"  # the lm_head, the largest matmul of a small-vocab model
    assert {helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "block_size"} == {block_size}
    assert not any(node.op_type == "MatMul" and any(i in {t.name for t in graph.initializer} for i in node.input)
                   for node in graph.node)  # no constant-weight MatMul left in fp32


def test_wrong_prompt_fails_the_quantized_gate(peft_adapters, tmp_path):
    """The quantized check on its own: the same int4 graph measured against another prompt's reference fails."""
    result = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int4", progress=False)
    ref = load_reference(MODELS / "gpt2", peft_adapters["causal-lm"])
    with pytest.raises(ParityError, match="prompt's own effect") as info:
        check_quantized(result.path, perturbed(ref, seed=7), result.manifest)
    assert max(info.value.report["relative_error"].values()) > REL_LIMIT


def _drop_first_virtual_token(monkeypatch):
    original = wrappers.CausalLMGraph.__init__

    def init(self, ref):
        table = ref.prompt_embeds(1)[0, 1:].detach().clone()
        original(self, PTuningModel(ref.base, table, ref.task).eval())

    monkeypatch.setattr(wrappers.CausalLMGraph, "__init__", init)


def _user_positions_from_zero(monkeypatch):
    original = wrappers.CausalLMGraph.__init__

    def init(self, ref):
        original(self, ref)
        self.offset -= self.n  # the user's first token at position 0, on top of the prompt

    monkeypatch.setattr(wrappers.CausalLMGraph, "__init__", init)


@pytest.mark.parametrize("defect", [_drop_first_virtual_token, _user_positions_from_zero])
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_export_fails_a_graph_with_a_defect(peft_adapters, tmp_path, monkeypatch, defect, quantize):
    """Defects whose effect is smaller than int4 noise on a random tiny Llama (dropping one of 5 virtual tokens;
    the user's positions overlapping the prompt's) are caught by the exact gate the fp32 graph must pass before it
    is quantized; the export fails and leaves nothing."""
    defect(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="differs from the PyTorch reference"):
        export(MODELS / "llama", peft_adapters["causal-lm-llama"], out, quantize=quantize, progress=False)
    assert not out.exists()
    report = json.loads((tmp_path / "out.parity-report.json").read_text())
    assert report["passed"] is False and "max_abs_diff" in report


def test_verify_reruns_the_quantized_gate_and_catches_the_wrong_adapter(peft_adapters, tmp_path, capsys):
    from conftest import make_peft_adapter

    from ptuning_onnx.cli import verify as verify_cli
    from ptuning_onnx.parity import verify

    out = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int8", progress=False).path
    assert verify(out)["passed"]
    other = make_peft_adapter(tmp_path / "other", MODELS / "gpt2", "CAUSAL_LM", "AutoModelForCausalLM", seed=3)[1]
    with pytest.raises(ParityError, match="prompt's own effect"):
        verify(out, base_model=MODELS / "gpt2", adapter=other)
    assert verify_cli.main([str(out), "--base-model", str(MODELS / "gpt2"), "--adapter", str(other)]) == 1
    assert "prompt's own effect" in capsys.readouterr().err
    assert verify_cli.main([str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert "relative_error" in json.loads(capsys.readouterr().out)


def test_int8_weights_have_one_scale_per_output_column(peft_adapters, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int8", progress=False).path
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert matmuls
    for node in matmuls:
        weight, zero = numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[3]])
        scale = numpy_helper.to_array(inits[node.input[3].replace("_zero_point", "_scale")])
        assert weight.dtype == np.int8 and scale.shape == zero.shape == (weight.shape[1],) and not zero.any()
        assert np.abs(weight).max(axis=0).min() >= 126  # every column uses its whole range


def test_quantize_with_fp16_is_refused(peft_adapters, tmp_path):
    from ptuning_onnx.errors import ConfigError

    with pytest.raises(ConfigError, match="fp32"):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int4", dtype="fp16")
    with pytest.raises(ConfigError, match="int2"):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int2")
    with pytest.raises(ConfigError, match="block size must be one of 16, 32, 64, 128, 256, got 48"):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int4", int4_block_size=48)
    for quantize, size in (("int8", 128), (None, 32)):  # the default size, asked for, is still out of place
        with pytest.raises(ConfigError, match="--int4-block-size goes with --quantize int4"):
            export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize=quantize,
                   int4_block_size=size)
    with pytest.raises(ConfigError, match="got 128.0"):
        export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", quantize="int4", int4_block_size=128.0)
    assert not (tmp_path / "out").exists()


def test_quantization_that_swamps_the_prompt_is_refused_with_the_reason(peft_adapters, tmp_path):
    """On the tiny BERT (hidden 64) the prompt moves the per-token logits less than int4 noise does (4.4x; int8
    with per-column scales stays under, at 0.68): the gate refuses, and says by how much, rather than ship a graph
    that cannot be shown to carry the prompt."""
    with pytest.raises(ParityError, match=r"by more than 0.75 of the prompt's own effect: logits=\d"):
        export(MODELS / "bert", peft_adapters["token-cls"], tmp_path / "out", quantize="int4", progress=False)
    assert not (tmp_path / "out").exists()


def test_quantized_gate_on_a_model_with_few_positions(tmp_path):
    """A GPT-2 of 26 positions with 5 virtual tokens leaves 21 user tokens: parity's cases stop at length 1 (the
    greedy steps take 16), and the quantized gate compares the longest padded case there is (it used to index an
    empty list). The export passes or fails the gate with a message; the exact gate ran first either way."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import make_peft_adapter

    config = GPT2Config.from_pretrained(MODELS / "gpt2")
    config.n_positions = 26
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (MODELS / "gpt2" / name).exists():
            (tmp_path / "base" / name).write_bytes((MODELS / "gpt2" / name).read_bytes())
    adapter = make_peft_adapter(tmp_path / "adapter", tmp_path / "base", "CAUSAL_LM", "AutoModelForCausalLM")[1]
    try:
        result = export(tmp_path / "base", adapter, tmp_path / "out", quantize="int8", progress=False)
    except ParityError as exc:
        assert "fp32" not in str(exc).split(":")[0]  # judged by the quantized gate, not an exact-gate failure
        return
    report = result.report
    assert report["gate"] == "quantized" and report["negative_control"]["failed_as_expected"]
    assert report["passed"] and result.manifest["model"]["max_user_tokens"] == 21
