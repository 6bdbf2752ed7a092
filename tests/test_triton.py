"""Triton model repositories: config.pbtxt parsed with Triton's own ``inference.ModelConfig`` schema (as the
``tritonclient`` package ships it), then checked against a real onnxruntime session on the graph under ``1/``:
names, then dims, then data types, then a run with inputs shaped as the config says.

No Triton server runs here (none on these machines): what a server would do beyond parsing its config is
documented in docs/TRITON.md, not tested.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, make_peft_adapter

ONNX_TYPES = {"TYPE_FP32": "tensor(float)", "TYPE_FP16": "tensor(float16)", "TYPE_INT64": "tensor(int64)"}


def _model_config_pb2():
    """tritonclient's generated ``model_config_pb2``, loaded from its file: ``tritonclient.grpc``'s package import
    needs grpcio, which the schema does not."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install tritonclient; the test extra brings it)")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2():
    return _model_config_pb2()


def parse(pb2, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{task: export folder} for one graph per kind: causal-lm (GPT-2), seq-cls (BERT, labels), seq2seq (T5)."""
    from ptuning_onnx.export import export

    root = tmp_path_factory.mktemp("triton")
    out = {}
    for task, model, peft_task, auto, labels in (
            ("causal-lm", "gpt2", "CAUSAL_LM", "AutoModelForCausalLM", None),
            ("seq-cls", "bert", "SEQ_CLS", "AutoModelForSequenceClassification", 3),
            ("seq2seq-lm", "t5", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", None)):
        make_peft_adapter(root / f"ad-{task}", MODELS / model, peft_task, auto, num_labels=labels)
        # Parity is proven by the export tests; these tests are about the repository written from a folder.
        out[task] = export(MODELS / model, root / f"ad-{task}", root / task, progress=False, skip_verify=True).path
    from ptuning_onnx.export.multi import export_multi

    make_peft_adapter(root / "ad-second", MODELS / "gpt2", "CAUSAL_LM", "AutoModelForCausalLM", num_virtual_tokens=3,
                      seed=1)
    out["multi"] = export_multi(MODELS / "gpt2", {"a": root / "ad-causal-lm", "b": root / "ad-second"}, root / "multi",
                                progress=False, skip_verify=True).path
    return out


def mismatches(pb2, config, graph: Path) -> list:
    """Where ``config`` and the graph disagree: names, then dims, then data types ([] when they agree)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    problems = []
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        actual = {v.name: v for v in actual}
        names = [t.name for t in declared]
        if sorted(names) != sorted(actual):
            problems.append(f"names {sorted(names)} != {sorted(actual)}")
            continue
        for tensor in declared:
            shape = actual[tensor.name].shape
            want = [d if isinstance(d, int) else -1 for d in shape[1:]]  # batch axis left out: max_batch_size > 0
            dims = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            if dims != want:
                problems.append(f"{tensor.name}: dims {dims} != {want}")
            kind = pb2.DataType.Name(tensor.data_type)
            if ONNX_TYPES.get(kind) != actual[tensor.name].type:
                problems.append(f"{tensor.name}: {kind} != {actual[tensor.name].type}")
    return problems


def run_as_configured(config, graph: Path, batch=3, length=5):
    """Feed the graph inputs built from the config alone (-1 -> a length; past lengths 0): it must run."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feed = {}
    for tensor in config.input:
        dims = tensor.reshape.shape if tensor.HasField("reshape") else tensor.dims  # what reaches the graph
        shape = [batch] + [length if d == -1 else d for d in dims]
        if tensor.name.startswith("past_key_values."):
            shape[2] = 0  # the first step: an empty past
        if tensor.name == "prompt_ids":  # a multi-prompt folder's adapter per row
            feed[tensor.name] = np.arange(batch, dtype=np.int64) % 2
        elif tensor.data_type == 9:  # TYPE_INT64
            feed[tensor.name] = np.ones(shape, np.int64) * (np.arange(shape[-1]) if "position" in tensor.name else 1)
        else:
            feed[tensor.name] = np.zeros(shape, np.float32)
    if "encoder_hidden_states" in feed:  # the encoder's output: the prompt's rows come first
        n = json.loads((graph.parent.parent / "ptuning_onnx.json").read_text())["num_virtual_tokens"]
        hidden = feed["encoder_hidden_states"]
        feed["encoder_hidden_states"] = np.zeros((batch, n + length, hidden.shape[2]), np.float32)
    return session.run(None, feed)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls", "seq2seq-lm", "multi"])
def test_repository_parses_with_tritons_schema_and_matches_the_graph(pb2, folders, task, tmp_path):
    from ptuning_onnx.triton import write_repository

    models = write_repository(folders[task], tmp_path / "repo", name="pt", max_batch_size=4)
    assert [m.name for m in models] == (["pt_encoder", "pt_decoder"] if task == "seq2seq-lm" else ["pt"])
    for model in models:
        config = parse(pb2, model / "config.pbtxt")
        assert config.name == model.name and config.backend == "onnxruntime" and config.max_batch_size == 4
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        graph = model / "1" / config.default_model_filename
        assert mismatches(pb2, config, graph) == []
        outputs = run_as_configured(config, graph)
        assert all(o.shape[0] == 3 for o in outputs)
    if task == "multi":  # prompt_ids (batch,): one element per request, reshaped to the graph's scalar per row
        prompt = next(t for t in parse(pb2, models[0] / "config.pbtxt").input if t.name == "prompt_ids")
        assert list(prompt.dims) == [1] and list(prompt.reshape.shape) == []
    if task == "seq-cls":
        logits = next(o for o in parse(pb2, models[0] / "config.pbtxt").output if o.name == "logits")
        labels = (models[0] / logits.label_filename).read_text().splitlines()
        id2label = json.loads((folders[task] / "ptuning_onnx.json").read_text())["model"]["id2label"]
        assert labels == [id2label[str(i)] for i in range(3)]


def test_negative_control_a_wrong_config_is_caught(pb2, folders, tmp_path):
    """The checks above can fail: a wrong dim and a misspelt field are both caught."""
    from google.protobuf import text_format

    from ptuning_onnx.triton import write_repository

    model = write_repository(folders["causal-lm"], tmp_path / "repo", name="pt")[0]
    text = (model / "config.pbtxt").read_text()
    wrong = text.replace("dims: [ -1, 1000 ]", "dims: [ -1, 999 ]", 1)
    assert wrong != text
    assert any("logits: dims" in p for p in mismatches(pb2, text_format.Parse(wrong, pb2.ModelConfig()),
                                                       model / "1" / "model.onnx"))
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        text_format.Parse(text.replace("max_batch_size", "max_batch_sise"), pb2.ModelConfig())


def test_causal_lm_sequence_config_keeps_the_kv_cache_as_state(pb2, folders, tmp_path):
    from ptuning_onnx.triton import write_repository

    model = write_repository(folders["causal-lm"], tmp_path / "repo", name="pt")[0]
    config = parse(pb2, model / "configs" / "sequence.pbtxt")
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    graph = json.loads((folders["causal-lm"] / "ptuning_onnx.json").read_text())["graphs"]["model"]
    past = [i for i in graph["inputs"] if i["name"].startswith("past_key_values.")]
    states = {s.input_name: s for s in config.sequence_batching.state}
    assert sorted(states) == sorted(i["name"] for i in past)
    for value in past:
        state = states[value["name"]]
        assert state.output_name == value["name"].replace("past_key_values", "present")
        assert list(state.dims) == [value["shape"][1], -1, value["shape"][3]]
        assert list(state.initial_state[0].dims) == [value["shape"][1], 0, value["shape"][3]]
    # The state is not also a declared input or output.
    assert [t.name for t in config.input] == ["input_ids", "attention_mask", "position_ids"]
    assert [t.name for t in config.output] == ["logits"]


def test_cli_writes_the_repository_and_refuses_bad_input(folders, tmp_path, capsys):
    from ptuning_onnx.cli.export import main

    base, adapter = MODELS / "gpt2", tmp_path / "ad"
    make_peft_adapter(adapter, base, "CAUSAL_LM", "AutoModelForCausalLM", num_virtual_tokens=3)
    repo = tmp_path / "repo"
    args = ["--base-model", str(base), "--adapter", str(adapter), "--quiet", "--skip-verify",
            "--triton-repository", str(repo)]
    assert main([*args, "--output", str(tmp_path / "out"), "--triton-model-name", "bad name!"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Triton model name 'bad name!'") and "\n" not in err
    assert not (tmp_path / "out").exists()  # refused before exporting
    assert main([*args, "--output", str(tmp_path / "out"), "--triton-max-batch-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["triton"] == [str(repo / "out")]
    assert "max_batch_size: 2" in (repo / "out" / "config.pbtxt").read_text()
    assert main([*args, "--output", str(tmp_path / "out2"), "--triton-model-name", "out"]) == 2
    assert "already has a model 'out'" in capsys.readouterr().err
