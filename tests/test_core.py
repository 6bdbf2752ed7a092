"""The P-tuning core against PEFT itself: config, encoder, adapter I/O, the reference model's placement."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MODELS, TASKS, make_peft_adapter, reference_vs_peft
from ptuning_onnx.adapter import Adapter, load_adapter, save_adapter
from ptuning_onnx.config import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType
from ptuning_onnx.encoder import PromptEncoder
from ptuning_onnx.errors import AdapterError, ConfigError
from ptuning_onnx.export import load_reference
from ptuning_onnx.reference import PTuningModel, load_base


def _peft_encoder(**kwargs):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.PromptEncoderConfig(peft_type="P_TUNING", **kwargs)
        return peft.PromptEncoder(cfg)


def test_config_fields_and_defaults_match_peft():
    import dataclasses

    import peft

    ours = {f.name: f.default for f in dataclasses.fields(PromptEncoderConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PromptEncoderConfig)}
    for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                 "num_layers", "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                 "encoder_dropout", "task_type", "inference_mode", "base_model_name_or_path", "revision"):
        assert name in ours, name
        assert ours[name] == theirs[name], name


@settings(max_examples=12, deadline=None)
@given(encoder=st.sampled_from(["MLP", "LSTM"]), n=st.integers(1, 12), dim=st.sampled_from([8, 16, 48]),
       hidden=st.sampled_from([None, 4, 24]), layers=st.integers(1, 3), submodules=st.sampled_from([1, 2]))
def test_encoder_matches_peft(encoder, n, dim, hidden, layers, submodules):
    kwargs = dict(num_virtual_tokens=n, token_dim=dim, num_transformer_submodules=submodules,
                  encoder_reparameterization_type=encoder, encoder_hidden_size=hidden or dim,
                  encoder_num_layers=layers if encoder == "LSTM" else 2, encoder_dropout=0.0)
    theirs = _peft_encoder(**kwargs).eval()
    ours = PromptEncoder(PromptEncoderConfig(**kwargs)).eval()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for attr in ("token_dim", "input_size", "output_size", "hidden_size", "total_virtual_tokens"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.encoder_type == theirs.encoder_type
    idx = torch.arange(n * submodules).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        want, got = theirs(idx), ours(idx)
        assert got.shape == (2, n * submodules, dim)
        assert (got - want).abs().max() <= 1e-6
        # negative control: one perturbed weight is seen by the same tolerance
        next(ours.mlp_head.parameters()).add_(1e-3)
        assert (ours(idx) - want).abs().max() > 1e-6


def test_inference_mode_has_only_the_table():
    cfg = PromptEncoderConfig(num_virtual_tokens=3, token_dim=8, inference_mode=True)
    enc = PromptEncoder(cfg)
    assert list(enc.state_dict()) == ["embedding.weight"]
    assert not hasattr(enc, "mlp_head") and not hasattr(enc, "lstm_head")
    assert torch.equal(enc.bake(), enc.embedding.weight)


def test_bake_uses_eval_mode_even_when_training():
    cfg = PromptEncoderConfig(num_virtual_tokens=4, token_dim=8, encoder_reparameterization_type="LSTM",
                              encoder_num_layers=2, encoder_dropout=0.5)
    enc = PromptEncoder(cfg).train()
    assert torch.equal(enc.bake(), enc.bake()) and enc.training


@pytest.mark.parametrize("kwargs,match", [
    (dict(encoder_reparameterization_type="GRU"), "unknown encoder_reparameterization_type 'GRU'"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0"),
    (dict(token_dim=-3), "token_dim must be a positive integer, got -3"),
    (dict(encoder_hidden_size=2.5), "encoder_hidden_size must be a positive integer, got 2.5"),
    (dict(encoder_dropout=1.0), r"encoder_dropout must be in \[0, 1\), got 1.0"),
    (dict(encoder_dropout=-0.1), r"encoder_dropout must be in \[0, 1\)"),
    (dict(task_type="SUMMARIZE"), "unknown task 'SUMMARIZE'"),
    (dict(num_virtual_tokens=None), "num_virtual_tokens is required"),
])
def test_config_errors_name_the_value(kwargs, match):
    base = dict(num_virtual_tokens=4, token_dim=8)
    with pytest.raises(ConfigError, match=match):
        PromptEncoderConfig(**{**base, **kwargs})


def test_encoder_type_accepts_string_or_enum():
    a = PromptEncoderConfig(num_virtual_tokens=1, token_dim=4, encoder_reparameterization_type="lstm")
    b = PromptEncoderConfig(num_virtual_tokens=1, token_dim=4,
                            encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM)
    assert a.encoder_reparameterization_type == b.encoder_reparameterization_type


# ---- adapters ---------------------------------------------------------------------------------------------


def test_peft_adapter_reads_and_rewrites(tmp_path):
    peft_model, path = make_peft_adapter(tmp_path / "peft", MODELS / "bert", "SEQ_CLS",
                                         "AutoModelForSequenceClassification", num_labels=3)
    adapter = load_adapter(path)
    assert adapter.config.task_type == TaskType.SEQ_CLS and adapter.config.inference_mode
    assert set(adapter.head_weights) == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        want = peft_model.get_prompt(1)[0]
    assert (adapter.prompt_embeddings - want).abs().max() <= 1e-6
    # our rewrite loads back in PEFT with identical outputs
    save_adapter(tmp_path / "ours", adapter)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    again = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(MODELS / "bert",
                                                                                          num_labels=3),
                                      tmp_path / "ours").eval()
    ids = torch.randint(5, 1000, (2, 6))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        assert (again(**kwargs).logits - peft_model(**kwargs).logits).abs().max() <= 1e-6


def test_pickle_adapter_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "P_TUNING", "num_virtual_tokens": 2}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04crash")  # would fail loudly if unpickled
    with pytest.raises(AdapterError, match="pickle file.*refusing"):
        load_adapter(folder)


@pytest.mark.parametrize("content,match", [
    ('{"peft_type": "LORA"}', "only P_TUNING"),
    ("{not json", "not valid JSON"),
])
def test_bad_adapter_configs(tmp_path, content, match):
    cfg = PromptEncoderConfig(num_virtual_tokens=2, token_dim=4)
    save_adapter(tmp_path / "ad", Adapter(cfg, torch.zeros(2, 4)))
    (tmp_path / "ad" / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterError, match=match):
        load_adapter(tmp_path / "ad")


def test_truncated_weights_are_refused(tmp_path):
    cfg = PromptEncoderConfig(num_virtual_tokens=2, token_dim=4)
    save_adapter(tmp_path / "ad", Adapter(cfg, torch.zeros(2, 4)))
    path = tmp_path / "ad" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(tmp_path / "ad")


# ---- the reference model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["causal-lm", "causal-lm-llama", "seq-cls", "token-cls", "feature-extraction",
                                  "seq2seq-lm"])
def test_reference_equals_peft_on_unpadded_rows(peft_adapters, task):
    import transformers
    from peft import PeftModel

    model, peft_task, auto = TASKS[task]
    kwargs = {"num_labels": 3} if task in ("seq-cls", "token-cls") else {}
    peft_model = PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(MODELS / model, **kwargs),
                                           peft_adapters[task]).eval()
    ref = load_reference(MODELS / model, peft_adapters[task])
    got, want = reference_vs_peft(peft_model, ref, 1000, seq2seq=task == "seq2seq-lm",
                                  slice_peft=task not in ("seq-cls", "seq2seq-lm"), token_types=model == "bert")
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    if task.startswith("causal"):
        ids = torch.randint(5, 1000, (2, 7))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            tokens = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                         do_sample=False)[:, -6:]
        assert torch.equal(tokens, ref.greedy(ids, mask, 6))


@pytest.mark.parametrize("task", ["causal-lm", "causal-lm-llama", "seq-cls", "token-cls", "feature-extraction"])
def test_left_padded_row_equals_row_alone(peft_adapters, task):
    """Batch invariance: the prompt sits at 0..n-1 and each row's first real token at n, whatever the padding."""
    model = TASKS[task][0]
    ref = load_reference(MODELS / model, peft_adapters[task])
    alone = torch.randint(5, 1000, (1, 5))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), alone], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    key = "last_hidden_state" if task == "feature-extraction" else "logits"
    with torch.no_grad():
        a = ref(alone, torch.ones_like(alone))[key]
        b = ref(padded, mask)[key]
    if task == "seq-cls":
        assert (a - b).abs().max() <= 1e-5
    else:
        assert (a - b[:, 4:]).abs().max() <= 1e-5
    if task.startswith("causal"):
        assert torch.equal(ref.greedy(alone, torch.ones_like(alone), 8), ref.greedy(padded, mask, 8))


def test_reference_rejects_mismatched_prompt_width():
    base = load_base(MODELS / "gpt2", TaskType.CAUSAL_LM)
    with pytest.raises(ConfigError, match="prompt token_dim is 32 but the base model's embedding width is 64"):
        PTuningModel(base, torch.zeros(4, 32), TaskType.CAUSAL_LM)


def test_training_mode_keeps_base_frozen_in_eval():
    base = load_base(MODELS / "bert", TaskType.SEQ_CLS, labels=["a", "b"])
    cfg = PromptEncoderConfig(num_virtual_tokens=2, task_type="SEQ_CLS").fill_from_model_config(base.config)
    model = PTuningModel(base, PromptEncoder(cfg), TaskType.SEQ_CLS).train()
    assert model.encoder.training and not model.base.bert.training and model.base.classifier.training
