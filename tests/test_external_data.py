"""External data (graph_io.py): the path a model over protobuf's 2 GiB takes, forced on tiny models so that CI
covers every pass with it. The 1.1B check itself is a tool: tools/bench_big.py."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import MODELS, TASKS

from ptuning_onnx import manifest as mf
from ptuning_onnx import runtime
from ptuning_onnx.errors import ManifestError
from ptuning_onnx.export import export, graph_io


def _locations(path):
    return graph_io.external_locations(onnx.load(str(path), load_external_data=False))


@pytest.mark.parametrize("options,task", [({}, "causal-lm-llama"), ({}, "seq2seq-lm"), ({"dtype": "fp16"}, "seq-cls"),
                                          ({"optimize": True}, "causal-lm"), ({"quantize": "int8"}, "causal-lm"),
                                          ({"quantize": "int4"}, "causal-lm-llama"),
                                          ({"optimize": True, "quantize": "int4"}, "causal-lm-llama")])
def test_every_pass_writes_one_data_file_per_graph(peft_adapters, tmp_path, options, task):
    model = TASKS[task][0]
    result = export(MODELS / model, peft_adapters[task], tmp_path / "out", external_data=True, progress=False,
                    **options)
    assert result.report["passed"]
    for name, graph in result.manifest["graphs"].items():
        data = graph["external_data"]
        assert data == f"{name}.onnx.data"
        assert _locations(result.path / graph["file"]) == {data}
        assert result.manifest["files"][data] == mf.sha256_file(result.path / data)
        # The graph file itself holds the structure only.
        assert (result.path / graph["file"]).stat().st_size < (result.path / data).stat().st_size
    # Nothing else was left behind (torch's per-tensor files, the passes' temporary graphs).
    assert sorted(p.name for p in result.path.iterdir()) == sorted([*result.manifest["files"], mf.MANIFEST_NAME])


def test_external_data_runs_like_the_single_file_export(exports, peft_adapters, tmp_path):
    inline = exports["causal-lm-llama"]
    outside = export(MODELS / "llama", peft_adapters["causal-lm-llama"], tmp_path / "out", external_data=True,
                     progress=False).path
    assert not (inline / "model.onnx.data").exists()
    a, b = runtime.load(inline), runtime.load(outside)
    ids = [[5, 6, 7, 8], [9, 10, 11, 12]]
    np.testing.assert_array_equal(a.generate(input_ids=ids, max_new_tokens=8), b.generate(input_ids=ids, max_new_tokens=8))
    from ptuning_onnx.parity import verify

    assert verify(outside)["passed"]


def test_finalize_streams_per_tensor_files_into_one(tmp_path):
    """What torch writes for a graph over 2 GiB (one file per tensor) becomes one page-aligned data file, with the
    same values, and the per-tensor files are removed."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    nodes, prev = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    before = set(os.listdir(tmp_path))
    assert len(before) == 4  # the graph and one file per weight
    graph_io.finalize(path, defaults={"k": 0}, external=True)
    assert set(os.listdir(tmp_path)) == {"model.onnx", "model.onnx.data"}
    loaded = onnx.load(str(path))
    for i, w in enumerate(weights):
        tensor = next(t for t in onnx.load(str(path), load_external_data=False).graph.initializer if t.name == f"w{i}")
        offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
        assert offset % graph_io.ALIGN == 0
        np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer
                                                                 if t.name == f"w{i}")), w)
    import onnxruntime as ort

    x = rng.standard_normal((1, 64)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weights[0] @ weights[1] @ weights[2], rtol=1e-4)


@pytest.fixture
def external_export(peft_adapters, tmp_path):
    return export(MODELS / "gpt2", peft_adapters["causal-lm"], tmp_path / "out", external_data=True,
                  progress=False).path


def test_data_file_symlinked_out_of_the_folder_is_refused(external_export, tmp_path):
    data = external_export / "model.onnx.data"
    moved = tmp_path / "elsewhere.data"
    os.replace(data, moved)
    data.symlink_to(moved)  # same bytes, same sha256: only the location is wrong
    for verify in (True, False):
        with pytest.raises(ManifestError, match="symlink"):
            runtime.load(external_export, verify=verify)


def test_manifest_pointing_outside_is_refused(external_export):
    import json

    path = external_export / mf.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for bad in ("../model.onnx.data", "/etc/passwd"):
        manifest["graphs"]["model"]["external_data"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match="outside"):
            runtime.load(external_export, verify=False)


def test_graph_whose_data_location_leaves_the_folder_is_refused(external_export, tmp_path):
    """A graph rewritten to read its weights from outside (not caught by sha256 when verification is off) is
    refused by onnxruntime, and that is a clear error."""
    model = onnx.load(str(external_export / "model.onnx"), load_external_data=False)
    os.replace(external_export / "model.onnx.data", tmp_path / "model.onnx.data")
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save_model(model, str(external_export / "model.onnx"))
    with pytest.raises(ManifestError):
        runtime.load(external_export)  # sha256 catches the modified graph
    with pytest.raises(runtime.SessionLoadError, match="model.onnx"):
        runtime.load(external_export, verify=False)


def test_the_size_default_and_both_cli_switches(peft_adapters, tmp_path, monkeypatch):
    """By default a graph goes outside above graph_io.EXTERNAL_THRESHOLD (lowered here so a tiny model crosses it);
    --no-external-data keeps it inside, --external-data forces it outside."""
    from ptuning_onnx.cli import export as export_cli

    monkeypatch.setattr(graph_io, "EXTERNAL_THRESHOLD", 1 << 10)
    common = ["--base-model", str(MODELS / "gpt2"), "--adapter", str(peft_adapters["causal-lm"]), "--quiet",
              "--skip-verify"]
    for flag, outside in ((None, True), ("--no-external-data", False), ("--external-data", True)):
        out = tmp_path / str(flag)
        assert export_cli.main([*common, "--output", str(out), *([flag] if flag else [])]) == 0
        assert (out / "model.onnx.data").is_file() is outside
        assert bool(_locations(out / "model.onnx")) is outside
        assert ("model.onnx.data" in mf.read_manifest(out)["files"]) is outside


def test_moving_a_single_file_graph_over_one_with_data_removes_the_stale_data(tmp_path):
    """graph_io.move of a graph without external data onto one that had it: no orphan data file is left for the
    manifest to list."""
    from onnx import helper, numpy_helper

    def graph(path, external):
        weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
        graph_io.save(helper.make_model(g), path, external=external)

    graph(tmp_path / "model.onnx", True)
    assert (tmp_path / "model.onnx.data").is_file()
    graph(tmp_path / "candidate.onnx", False)
    graph_io.move(tmp_path / "candidate.onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists() and not _locations(tmp_path / "model.onnx")
